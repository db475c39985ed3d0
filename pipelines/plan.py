"""``medseg plan``: dataset folder → verified manifest → fingerprint (cached) → plan for one model → ``plan.json``.

``medseg train`` without ``--config`` runs the same steps (:func:`plan_dataset`) and saves the plan in the run
directory. See ``docs/planning.md`` for the rules.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.core.atomic import atomic_open
from medseg.data import Manifest, load_manifest, require_valid
from medseg.data.fingerprint import load_or_compute_fingerprint
from medseg.training.plan import PLAN_FILE, Plan, make_plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanRequest:
    """What ``medseg plan`` was asked.

    Attributes:
        data: dataset folder.
        model: registered dense model name.
        device: ``cpu``, ``cuda`` or ``auto``.
        memory_gib: memory budget of one training step (``None``: the device's default).
        out: where to write ``plan.json`` (default: the dataset folder).
        fingerprint: fingerprint cache file (default: ``medseg_fingerprint.json`` in the dataset folder).
        model_kwargs: builder keyword arguments (``model.kwargs``).
        configuration: ``auto``, ``3d_fullres``, ``3d_lowres`` or ``2d`` (:data:`medseg.training.plan.CONFIGURATIONS`).
    """

    data: Path
    model: str
    device: str = "cpu"
    memory_gib: float | None = None
    out: Path | None = None
    fingerprint: Path | None = None
    model_kwargs: dict[str, Any] | None = None
    configuration: str = "auto"


def verified_manifest(data: Path) -> Manifest:
    """Load and verify the dataset; problems raise one ``DataError`` (all of them logged)."""
    manifest = load_manifest(data)
    require_valid(manifest)
    return manifest


def plan_dataset(
    manifest: Manifest,
    model: str,
    *,
    device: str = "cpu",
    memory_gib: float | None = None,
    fingerprint: Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **fixed: Any,
) -> Plan:
    """Fingerprint (from the cache when the files are unchanged) and plan ``model`` on ``manifest``.

    ``fixed`` goes to :func:`medseg.training.plan.make_plan`: ``configuration``, and ``spacing`` / ``patch_size`` /
    ``batch_size`` a config file sets.
    """
    fp = load_or_compute_fingerprint(manifest, fingerprint)
    return make_plan(fp, model, device=device, memory_gib=memory_gib, model_kwargs=model_kwargs, **fixed)


def write_plan(plan: Plan, path: Path, sources: dict[str, str] | None = None) -> Path:
    """Write ``plan.json`` atomically; ``sources`` (``{"section.key": "plan" | "--config FILE"}``) says who set what."""
    data = plan.to_dict()
    if sources:
        data["sources"] = sources
    with atomic_open(path) as fh:
        json.dump(data, fh, indent=1)
    return path


def plan(req: PlanRequest) -> tuple[Plan, Path]:
    """Run ``medseg plan``; returns the plan and the ``plan.json`` written."""
    manifest = verified_manifest(req.data)
    result = plan_dataset(
        manifest,
        req.model,
        device=req.device,
        memory_gib=req.memory_gib,
        fingerprint=req.fingerprint,
        model_kwargs=req.model_kwargs,
        configuration=req.configuration,
    )
    out = req.out if req.out is not None else manifest.root / PLAN_FILE
    if out.is_dir():
        out = out / PLAN_FILE
    return result, write_plan(result, out)
