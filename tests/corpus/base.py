"""The corpus case record and the small valid images the malformed files are derived from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (8, 7, 6)  # (X, Y, Z) of every valid volume


@dataclass(frozen=True)
class Case:
    """One corpus file.

    Attributes:
        name: unique id ``format/what`` (e.g. ``nrrd/data-file-dev-zero``).
        path: the file (or DICOM folder) to read.
        valid: True for the few files that must load.
        header_refuses: whether :func:`medseg.io.read_header` alone must refuse it (the lie is in the header);
            False where only decoding can tell (a truncated compressed stream, NaN voxels).
        options: keyword options for ``load_image`` / ``read_header`` (e.g. ``allow_external_data=True``).
        upload: whether the file can be sent to the server as one upload (folders cannot).
        volume: a valid 3D volume the tiny served model can segment (the server must answer 200).
    """

    name: str
    path: Path
    valid: bool = False
    header_refuses: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    upload: bool = True
    volume: bool = False


def volume(seed: int = 0) -> np.ndarray:
    """A float32 ``SHAPE`` volume of smooth values plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    return (np.sin(grid.sum(-1) / 3.0) + rng.normal(0, 0.1, SHAPE)).astype(np.float32)


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, shifted RAS affine."""
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) * np.array([0.9, 1.1, 2.0])[None, :]
    affine[:3, 3] = (-12.0, 30.5, 7.25)
    return affine


def zeros_stream(n_bytes: int, wbits: int) -> bytes:
    """``n_bytes`` zeros compressed as zlib (``wbits`` 15), gzip (31) or raw deflate (-15), built in chunks."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = bytes(1 << 20)
    out = [comp.compress(chunk) for _ in range(n_bytes // len(chunk))]
    out.append(comp.compress(bytes(n_bytes % len(chunk))))
    out.append(comp.flush())
    return b"".join(out)
