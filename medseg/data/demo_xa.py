"""The angiography demo's data: X-ray angiography runs of a vessel-tree phantom, written as DICOM and read back.

Each run is a projection through a smooth random "anatomy" (Gaussian blobs of attenuation plus fine band-limited
texture, which registration needs) and a random vessel tree (a trunk that branches twice at each level, curved
segments with a Gaussian cross-section of radius 1-3.5 pixels, thinner at each level). The stored (``LIN``)
intensity of frame ``t`` is

    ``I0 * exp(-(mu_bg(p - s_t) + sum_k opacity_k(t) * mu_k(p - s_t)))`` (+ Poisson-like noise)

where ``mu_k`` is the attenuation of the tree's level ``k`` and ``s_t`` the patient's displacement at that frame:
zero during the mask frames and a known sub-pixel shift afterwards (the patient moved once, after the mask was
taken). Contrast arrives after ``contrast_frame`` frames and flows down the tree: level ``k`` fills
``level_delay`` frames after level ``k - 1``, so a later frame shows more of the tree. The phantom is evaluated
analytically at the shifted positions, so the shift is exact. No Mask Subtraction Sequence is written: medseg's
adapter (:mod:`medseg.io.xa`) must find the mask frames (the frames before contrast) and the shift itself.

The segmentation target is the whole tree (every pixel within a vessel's radius) on the minimum-intensity
projection of the subtracted run (``derive="minip"``), the image public DSA vessel datasets annotate.
:func:`write_xa_dataset` writes the runs (``runs/*.dcm``), a paired training folder of the minIPs read back through
:func:`medseg.io.load_image` (``train/images``, ``train/labels``) and held-out runs with their truth.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medseg.core.errors import ConfigError
from medseg.io import load_image, save_image, save_mask

logger = logging.getLogger(__name__)

__all__ = ["LABEL_NAMES", "XARun", "XASettings", "render_xa_run", "write_xa_dataset", "write_xa_dicom"]

LABEL_NAMES = ("background", "vessel")
XA_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"
I0 = 20000.0
_UID_ROOT = "1.2.826.0.1.3680043.10.1436."  # generated UIDs are random below this prefix (pydicom's generate_uid)


@dataclass(frozen=True)
class XASettings:
    """One phantom run.

    Attributes:
        rows, columns: frame size in pixels.
        frames: frames in the run.
        contrast_frame: 0-based frame at which contrast starts to arrive (the frames before it are mask frames).
        level_delay: frames between the filling of one tree level and the next.
        levels: branching levels of the tree (1 trunk, then 2, 4, ... segments).
        shift: ``(row, column)`` displacement of the patient in the frames after the mask frames, in pixels.
        noise: relative quantum noise (standard deviation of a frame over ``sqrt(I)``-scaled Gaussian noise).
        pixel_mm: Imager Pixel Spacing in mm (a magnification of 1.2 is stated too).
    """

    rows: int = 128
    columns: int = 128
    frames: int = 12
    contrast_frame: int = 4
    level_delay: int = 1
    levels: int = 4
    shift: tuple[float, float] = (0.6, -1.3)
    noise: float = 1.0
    pixel_mm: float = 0.3

    def __post_init__(self) -> None:
        if self.contrast_frame < 2 or self.contrast_frame >= self.frames:
            raise ConfigError(
                f"contrast_frame {self.contrast_frame} with {self.frames} frames",
                expected="at least 2 mask frames before contrast and one frame after",
            )


@dataclass
class XARun:
    """A rendered run and its answers.

    Attributes:
        frames: stored frames ``(T, rows, columns)`` uint16.
        vessels: the whole tree ``(rows, columns)`` bool at the live frames' position (where the subtracted frames
            and their minIP show it): the segmentation target.
        mask_frames: 1-based frames the adapter should choose as the mask.
        shift: the known ``(row, column)`` displacement of the live frames.
    """

    frames: np.ndarray
    vessels: np.ndarray
    mask_frames: list[int]
    shift: tuple[float, float]


class _Tree:
    """Curved branching segments: sampled centre lines, radius and level of each."""

    def __init__(self, rows: int, columns: int, levels: int, rng: np.random.Generator) -> None:
        self.segments: list[tuple[np.ndarray, float, int]] = []  # (points (n, 2) in (row, col), radius, level)
        size = min(rows, columns)
        start = np.array([rng.uniform(0.05, 0.15) * rows, rng.uniform(0.35, 0.65) * columns])
        angle = np.pi / 2 + rng.uniform(-0.3, 0.3)  # trunk heads down the rows
        self._grow(start, angle, 0.42 * size, 0.028 * size + 1.5, 0, levels, rng)

    def _grow(
        self,
        start: np.ndarray,
        angle: float,
        length: float,
        radius: float,
        level: int,
        levels: int,
        rng: np.random.Generator,
    ) -> None:
        if level >= levels:
            return
        n = max(8, int(length))
        t = np.linspace(0.0, 1.0, n)
        bend = rng.uniform(-0.6, 0.6)
        headings = angle + bend * t
        steps = np.stack([np.sin(headings), np.cos(headings)], axis=1) * (length / n)
        points = start + np.cumsum(steps, axis=0)
        self.segments.append((points, max(radius, 1.0), level))
        end, heading = points[-1], headings[-1]
        for side in (-1, 1):
            self._grow(
                end, heading + side * rng.uniform(0.35, 0.8), length * 0.68, radius * 0.72, level + 1, levels, rng
            )


def _distance_to_polyline(
    r: np.ndarray, c: np.ndarray, shift: tuple[float, float], points: np.ndarray, margin: float
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Distance of the grid points ``(r, c)`` (pixel index minus ``shift``) to the polyline ``points``, only inside
    its bounding box widened by ``margin``: ``(box, distances in the box)``."""
    lo = np.floor(points.min(axis=0) - margin + np.asarray(shift)).astype(int)
    hi = np.ceil(points.max(axis=0) + margin + np.asarray(shift)).astype(int) + 1
    box = (slice(max(lo[0], 0), max(min(hi[0], r.shape[0]), 0)), slice(max(lo[1], 0), max(min(hi[1], r.shape[1]), 0)))
    r, c = r[box], c[box]
    out = np.full(r.shape, np.inf, dtype=np.float32)
    for a, b in zip(points[:-1], points[1:], strict=True):
        d = b - a
        denom = float(d @ d) or 1e-12
        u = np.clip(((r - a[0]) * d[0] + (c - a[1]) * d[1]) / denom, 0.0, 1.0)
        dist = np.hypot(r - (a[0] + u * d[0]), c - (a[1] + u * d[1]))
        np.minimum(out, dist, out=out)
    return box, out


def _render(
    settings: XASettings, tree: _Tree, seed: int, shift: tuple[float, float], vessels: bool = True
) -> tuple[np.ndarray, ...]:
    """``(mu_bg, mu_levels (L, rows, cols), vessel_mask)`` of the phantom displaced by ``shift`` (``vessels=False``:
    the anatomy alone, with empty vessel levels)."""
    rows, cols = settings.rows, settings.columns
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(
        np.arange(rows, dtype=np.float32) - shift[0], np.arange(cols, dtype=np.float32) - shift[1], indexing="ij"
    )
    mu_bg = np.full((rows, cols), 0.6, dtype=np.float32)
    for _ in range(30):
        r0, c0 = rng.uniform(0, rows), rng.uniform(0, cols)
        sigma = rng.uniform(0.05, 0.15) * min(rows, cols)
        mu_bg += np.float32(rng.uniform(0.05, 0.25)) * np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * sigma**2))
    waves = 60
    for _ in range(waves):  # fine anatomical texture: the mask frames and live frames must be registrable
        wavelength, angle, phase = rng.uniform(3, 20), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = (rr * np.cos(angle) + cc * np.sin(angle)) / wavelength
        mu_bg += np.float32(0.3 / np.sqrt(waves)) * np.cos(2 * np.pi * wave + phase)
    mu_levels = np.zeros((settings.levels, rows, cols), dtype=np.float32)
    vessel = np.zeros((rows, cols), dtype=bool)
    for points, radius, level in tree.segments if vessels else ():
        box, dist = _distance_to_polyline(rr, cc, shift, points, 3 * radius + 2)
        profile = 0.5 * np.exp(-(dist**2) / (2 * (0.6 * radius) ** 2))  # Gaussian cross-section
        np.maximum(mu_levels[level][box], profile, out=mu_levels[level][box])
        vessel[box] |= dist <= radius
    return mu_bg, mu_levels, vessel


def render_xa_run(settings: XASettings, seed: int) -> XARun:
    """Render one run of the phantom (see the module docstring); the same ``seed`` gives the same run."""
    rng = np.random.default_rng(seed)
    tree = _Tree(settings.rows, settings.columns, settings.levels, rng)
    anatomy_seed = int(rng.integers(2**31))
    still = _render(settings, tree, anatomy_seed, (0.0, 0.0), vessels=False)  # mask frames: no contrast yet
    moved = _render(settings, tree, anatomy_seed, settings.shift)
    frames = np.empty((settings.frames, settings.rows, settings.columns), dtype=np.uint16)
    noise_rng = np.random.default_rng(seed + 1)
    for t in range(settings.frames):
        mu_bg, mu_levels, _ = still if t < settings.contrast_frame else moved
        mu = mu_bg.copy()
        for level in range(settings.levels):
            arrival = settings.contrast_frame + level * settings.level_delay
            opacity = float(np.clip((t - arrival + 1) / 2.0, 0.0, 1.0))  # fills over two frames
            if opacity > 0:
                mu += opacity * mu_levels[level]
        intensity = I0 * np.exp(-mu)
        intensity += settings.noise * np.sqrt(intensity) * noise_rng.standard_normal(intensity.shape)
        frames[t] = np.clip(np.round(intensity), 1, 65535).astype(np.uint16)
    # The adapter's rule: contrast arrives at frame contrast_frame (0-based); it averages the frames before, at most
    # 4, leaving out the frame just before arrival when two or more precede it.
    before = list(range(1, settings.contrast_frame + 1))[-5:]
    mask_frames = before[:-1] if len(before) >= 2 else before
    return XARun(frames, moved[2], mask_frames[-4:], settings.shift)


def phantom_cine_dataset(
    sop_class: str, modality: str, shape: tuple[int, ...], *, bits: int, frame_time_ms: float
) -> Dataset:
    """A monochrome multi-frame phantom dataset without pixels: UIDs, file meta, ``shape (T, rows, columns)``,
    ``bits`` unsigned, a constant Frame Time."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(_UID_ROOT)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(_UID_ROOT), generate_uid(_UID_ROOT)
    ds.Modality = modality
    ds.PatientID = "phantom"
    ds.SeriesNumber = 1
    n, rows, cols = shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.NumberOfFrames = n
    ds.FrameTime = f"{frame_time_ms:g}"
    ds.FrameIncrementPointer = 0x00181063
    return ds


def write_xa_dicom(path: str | Path, frames: np.ndarray, pixel_mm: float = 0.3, frame_time_ms: float = 66.7) -> Path:
    """Write ``frames (T, rows, columns)`` uint16 as a single-plane XA Image (``LIN``, no mask items).

    Imager Pixel Spacing ``pixel_mm`` with an Estimated Radiographic Magnification Factor of 1.2, so the adapter
    reports a calibrated isocentre spacing of ``pixel_mm / 1.2``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = phantom_cine_dataset(XA_IMAGE_STORAGE, "XA", frames.shape, bits=16, frame_time_ms=frame_time_ms)
    ds.PixelIntensityRelationship = "LIN"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.ImagerPixelSpacing = [f"{pixel_mm:g}", f"{pixel_mm:g}"]
    ds.EstimatedRadiographicMagnificationFactor = "1.2"
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = "30", "-15"
    ds.PixelData = np.ascontiguousarray(frames, dtype="<u2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _save_pair(image: MetaTensor, label: np.ndarray, images: Path, labels: Path, case: str) -> None:
    save_image(image, images / f"{case}.nii.gz")
    save_mask(torch.from_numpy(label.astype(np.uint8)), image, labels / f"{case}.nii.gz")


def write_xa_dataset(
    root: str | Path, n_train: int = 16, n_heldout: int = 4, settings: XASettings | None = None, seed: int = 0
) -> tuple[Path, Path]:
    """Write the angiography demo's runs and datasets under ``root``.

    Layout: ``runs/{case}.dcm`` (every run as DICOM), ``train/`` (paired: ``images/`` minIPs read back through
    :func:`medseg.io.load_image` with ``derive="minip"``, ``labels/`` the tree, ``dataset.yaml``) and ``heldout/``
    (the same for the held-out runs, plus ``truth.json`` with each run's mask frames and shift).

    Returns:
        ``(train_root, heldout_root)``.
    """
    root = Path(root)
    settings = settings or XASettings()
    train_root, heldout_root = root / "train", root / "heldout"
    truth = {}
    for i in range(n_train + n_heldout):
        case = f"xa_{i:03d}"
        run = render_xa_run(settings, seed * 1000 + i)
        dicom = write_xa_dicom(root / "runs" / f"{case}.dcm", run.frames, settings.pixel_mm)
        minip = load_image(dicom, modality_options={"derive": "minip"})
        label = run.vessels.T[:, :, None]  # (rows, cols) -> medseg's (X = column, Y = row, 1)
        target = train_root if i < n_train else heldout_root
        _save_pair(minip, label, target / "images", target / "labels", case)
        if i >= n_train:
            truth[case] = {"dicom": str(dicom), "mask_frames": run.mask_frames, "shift": list(run.shift)}
    yaml = "name: xa_vessels\nlabels: {0: background, 1: vessel}\nmodality: XA\n"
    for folder in (train_root, heldout_root):
        (folder / "dataset.yaml").write_text(yaml)
    (heldout_root / "truth.json").write_text(json.dumps(truth, indent=2))
    logger.info("wrote %d training and %d held-out XA runs under %s", n_train, n_heldout, root)
    return train_root, heldout_root
