"""Data-parallel training across processes (PyTorch DDP): process group, rank helpers, sharding and seeds.

A run is distributed when ``torch.distributed`` is initialised with more than one process, which
:func:`process_group` does from the variables ``torchrun`` sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPU, NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``). Every
helper here is the identity in a single process, so the single-process trainer is unchanged.

``train.batch_size`` is the **global** batch: each of the ``W`` ranks loads ``batch_size / W`` samples per step
(:func:`per_rank_batch`, which refuses a batch size not divisible by ``W``). The epoch's sampler draws the same
indices on every rank (its generator is seeded from ``(train.seed, epoch)``); :class:`RankSlices` hands rank ``r``
the slice ``[r * b, (r + 1) * b)`` of every global batch of ``W * b`` indices, so the ranks draw disjoint,
deterministic parts whose union is what one process with the same batch size draws. Augmentation and dropout streams
are seeded per rank (:func:`rank_seed`; rank 0 keeps the single-process seeds).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medseg.core.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes training together (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes the run directory (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Initialise the process group from ``torchrun``'s variables while the block runs, then destroy it.

    Does nothing when not launched with more than one process, or when the caller already initialised the group
    (then the caller destroys it). On CUDA it selects ``cuda:LOCAL_RANK`` first (NCCL), on CPU it uses gloo.
    The group is destroyed in a ``finally``, so a rank that fails leaves cleanly; ``torchrun`` then stops the others.
    """
    if launched_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend=backend)
    logger.info("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, world: int | None = None) -> int:
    """Samples each rank loads per step for the global ``train.batch_size`` on ``world`` processes (default: this
    run's :func:`world_size`).

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the number of processes.
    """
    world = world_size() if world is None else world
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size={batch_size} cannot be split over {world} processes",
            expected=f"a multiple of {world} (train.batch_size is the global batch, summed over the processes)",
            hint=f"set train.batch_size to {max(world, batch_size // world * world)} or run on another number of "
            "processes",
        )
    return batch_size // world


def rank_seed(seed: int, run_seed: int, epoch: int, stream: int) -> int:
    """The seed of random stream ``stream`` of this rank in epoch ``epoch``: ``seed`` (the single-process seed of
    that stream) on rank 0, else drawn from ``SeedSequence((run_seed, epoch, rank, stream))``."""
    r = rank()
    if r == 0:
        return int(seed)
    return int(np.random.SeedSequence((int(run_seed), int(epoch), r, int(stream))).generate_state(1)[0])


class RankSlices(torch.utils.data.Sampler[int]):
    """This rank's share of a sampler: slice ``[r * b, (r + 1) * b)`` of every run of ``W * b`` indices.

    Args:
        base: the sampler every rank draws identically (seeded alike).
        per_rank: ``b``, the samples this rank loads per step.
        rank_index: ``r`` (default: this process's :func:`rank`).
        world: ``W`` (default: this run's world size).
    """

    def __init__(
        self,
        base: Sequence[int] | torch.utils.data.Sampler[int],
        per_rank: int,
        rank_index: int | None = None,
        world: int | None = None,
    ) -> None:
        self.base = base
        self.per_rank = per_rank
        self.rank = rank() if rank_index is None else rank_index
        self.world = world_size() if world is None else world

    def __iter__(self) -> Iterator[int]:
        chunk = self.per_rank * self.world
        indices = list(self.base)
        for start in range(0, len(indices) - chunk + 1, chunk):
            lo = start + self.rank * self.per_rank
            yield from indices[lo : lo + self.per_rank]

    def __len__(self) -> int:
        return len(self.base) // (self.per_rank * self.world) * self.per_rank  # type: ignore[arg-type]


def shard(n: int) -> range:
    """This rank's items of ``n`` (every ``W``-th, starting at the rank): e.g. the validation cases."""
    return range(rank(), n, world_size())


def gather_items(items: dict[int, T]) -> dict[int, T]:
    """Every rank's ``{index: value}`` merged, on every rank (the input itself in a single process)."""
    if not is_distributed():
        return items
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, items)
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return merged


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (``value`` itself in a single process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class LossModule(nn.Module):
    """Wraps a model and a loss-of-batch function so that DDP sees one forward per step, whichever method of the
    model the loss calls (``forward`` or e.g. ``forward_low_res``).

    Args:
        model: the network (its parameters are the ones DDP synchronises).
        loss_of_batch: ``batch -> scalar loss`` computed with ``model``.
    """

    def __init__(self, model: nn.Module, loss_of_batch: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_of_batch = loss_of_batch

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_of_batch(batch)


def wrap_ddp(model: nn.Module, loss_of_batch: Any, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around :class:`LossModule` (rank 0's weights are broadcast to every rank).

    ``find_unused_parameters`` is on: some networks train only part of their parameters (SAM-UNet's point embeddings
    stay unused with box prompts); it costs one traversal of the autograd graph per step.
    """
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        LossModule(model, loss_of_batch), device_ids=ids, find_unused_parameters=True
    )
