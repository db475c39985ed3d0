"""Network backends for the sliding-window engine: PyTorch (fp32, bf16 autocast, CUDA AMP) and OpenVINO.

A backend turns a module into a :data:`~medseg.inference.engine.Forward`: windows ``(B, C_in, *P)`` (CPU tensors) ->
float32 logits ``(B, C_out, *P)`` on the CPU. The choice happens once, at load:

* ``precision="auto"``: CUDA -> float16 autocast (AMP); CPU -> float32 (bf16 autocast is opt-in: it is fast only
  where the CPU has native bf16 and must be shown to keep Dice on the task, see ``benchmarks/predict_speed.py``).
* ``precision="bf16"`` on a CPU without native bf16 is refused: it would run many times slower than float32.
* Threads: the backends use torch's intra-op thread count (set once per process by the CLI with
  :func:`medseg.core.cpu.configure_threads`; Ray workers set their own share).
* ``backend="openvino"`` (optional extra ``openvino``): the module is converted in memory for one fixed window
  shape, compiled for the CPU and cached as IR next to the weights (``<cache_dir>/openvino-<key>.xml``), so the next
  process skips the conversion. ``precision="bf16"`` compiles the same float32 IR with the CPU plugin's bf16
  inference precision (``INFERENCE_PRECISION_HINT``), under the same native-bf16 rule as PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from medseg.core.cpu import cpu_info
from medseg.core.errors import ConfigError
from medseg.inference.engine import Forward

logger = logging.getLogger(__name__)

__all__ = ["Backend", "BackendChoice", "make_forward", "resolve_precision"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
BackendName = Literal["torch", "openvino"]


@dataclass(frozen=True)
class BackendChoice:
    """What runs the network: ``backend`` (torch / openvino) at ``precision`` on ``device``."""

    backend: BackendName
    precision: Literal["fp32", "bf16", "fp16"]
    device: str

    def describe(self) -> str:
        """E.g. ``torch fp32 on cpu``."""
        return f"{self.backend} {self.precision} on {self.device}"


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16", "fp16"]:
    """The precision ``auto`` stands for on ``device``, and a check of an explicit one.

    Raises:
        ConfigError: bf16 on a CPU without native bf16, or fp16 on a CPU.
    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if device.type == "cpu" and precision == "bf16" and not cpu_info().native_bf16:
        raise ConfigError(
            "precision bf16 was asked for but this CPU has no native bf16 (AVX512-BF16 or AMX)",
            expected="precision fp32 (or auto) on this machine",
            hint=f"CPU: {cpu_info().model}",
        )
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("precision fp16 runs on CUDA only", expected="fp32 or bf16 on a CPU")
    return precision


class Backend:
    """A network ready for the engine.

    Args:
        model: the network (eval mode is set here).
        device: where it runs.
        precision: see :func:`resolve_precision`.
        backend: ``torch`` or ``openvino`` (CPU only).
        window: ``(B, C_in, *P)`` shape the OpenVINO model is compiled for (required for ``openvino``).
        cache_dir: where the OpenVINO IR is cached (``None``: not cached).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        precision: Precision = "auto",
        backend: BackendName = "torch",
        window: Sequence[int] | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.device = device
        self.model = model.to(device).eval()
        resolved = resolve_precision(precision, device)
        if backend == "openvino":
            if device.type != "cpu":
                raise ConfigError("the openvino backend runs on the CPU", expected="device cpu, or backend torch")
            if resolved not in ("fp32", "bf16"):
                raise ConfigError(
                    f"the openvino backend runs in fp32 or bf16, not {resolved}",
                    expected="precision fp32, auto or (CPUs with native bf16) bf16",
                )
            if window is None:
                raise ConfigError("the openvino backend needs the window shape to compile for")
            self._compiled = _openvino_model(self.model, tuple(int(s) for s in window), cache_dir, resolved)
        elif backend != "torch":
            raise ConfigError(f"unknown backend {backend!r}", expected="torch or openvino")
        self.choice = BackendChoice(backend, resolved, device.type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C_out, *P)`` float32 on the CPU for windows ``x (B, C_in, *P)``."""
        if self.choice.backend == "openvino":
            result = self._compiled(x.contiguous().numpy())
            return torch.from_numpy(next(iter(result.values())).copy())
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        autocast: Any = contextlib.nullcontext()
        if self.choice.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.choice.precision == "bf16" else torch.float16
            autocast = torch.autocast(self.device.type, dtype=dtype)
        with torch.inference_mode(), autocast:
            y = self.model(x)
        return y.float().cpu()


def make_forward(model: nn.Module, device: torch.device, **options: Any) -> Forward:
    """:class:`Backend` as a plain callable (see there for ``options``)."""
    return Backend(model, device, **options)


def _openvino_model(model: nn.Module, window: tuple[int, ...], cache_dir: Path | None, precision: str) -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError(
            "the openvino backend needs the openvino package",
            hint="pip install 'medseg[openvino]' (or use backend torch)",
        ) from None
    core = ov.Core()
    xml: Path | None = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(window).encode())
        xml = Path(cache_dir) / f"openvino-{digest.hexdigest()[:16]}.xml"
    if xml is not None and xml.is_file():
        ov_model = core.read_model(str(xml))
        logger.info("openvino model read from %s", xml)
    else:
        example = torch.zeros(window)
        with torch.inference_mode():
            ov_model = ov.convert_model(model, example_input=example, input=[list(window)])
        if xml is not None:
            try:
                xml.parent.mkdir(parents=True, exist_ok=True)
                tmp = xml.with_name(f".{xml.name}.tmp.xml")
                ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
                tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
                tmp.replace(xml)
            except OSError as err:  # a read-only run directory still predicts
                logger.warning("could not cache the openvino model in %s (%s)", xml.parent, err)
    threads = torch.get_num_threads()  # the process's choice (one per worker under Ray, the cores otherwise)
    # The IR stays float32 (one cache entry for both precisions); bf16 is the CPU plugin's execution precision, with
    # float32 inputs and outputs.
    hint = "bf16" if precision == "bf16" else "f32"
    return core.compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint})
