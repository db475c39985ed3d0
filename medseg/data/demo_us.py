"""The ultrasound demo's data: fan-shaped B-mode cines with speckle, written as DICOM and read back.

Each cine is what a phased-array scanner shows: a sector (fan) with its apex at the top centre of the screen, an
opening of ``2 x half_angle_deg`` and depths ``near``..``far`` (fractions of the frame height), black outside it,
and a grey-level bar plus a depth scale drawn on the screen beside the fan (graphics, not image). Inside the fan the
tissue echogenicity is smooth random texture times fully developed speckle (the magnitude of a complex Gaussian
field low-pass filtered to the speckle size: Rayleigh distributed), log-compressed to 8 bits as scanners store it.
The target is a dark (anechoic) chamber, an ellipse whose size beats over the cine (``beat_fraction``), with a
bright rim; every frame has its own speckle.

The DICOM file (US Multi-frame Image) has one Sequence of Ultrasound Regions item: a 2D tissue region (spatial
format 1, data type 1) whose box is the fan's bounding box and whose Physical Delta X/Y give the pixel size in cm.
:func:`medseg.io.load_image` therefore crops every frame to that box (the bar and scale stay out) and calibrates the
spacing; a mask made on the crop goes back onto the full screen with the adapter's ``restore_mask``
(:func:`medseg.inference.planar.source_mask`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from scipy import ndimage

from medseg.core.errors import ConfigError
from medseg.data.demo_xa import phantom_cine_dataset
from medseg.io import load_image, save_image, save_mask

logger = logging.getLogger(__name__)

__all__ = ["LABEL_NAMES", "USCine", "USSettings", "render_us_cine", "write_us_dataset", "write_us_dicom"]

LABEL_NAMES = ("background", "chamber")
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"


@dataclass(frozen=True)
class USSettings:
    """One cine.

    Attributes:
        rows, columns: screen size in pixels.
        frames: frames in the cine.
        half_angle_deg: half the fan's opening angle.
        near, far: the fan's depth range as fractions of ``rows`` (from the apex at row 0).
        speckle_px: speckle grain size in pixels (the low-pass sigma of the complex field).
        beat_fraction: relative change of the chamber's radii over the cine.
        pixel_cm: Physical Delta X and Y of the region, in cm.
    """

    rows: int = 120
    columns: int = 160
    frames: int = 8
    half_angle_deg: float = 38.0
    near: float = 0.06
    far: float = 0.95
    speckle_px: float = 1.2
    beat_fraction: float = 0.18
    pixel_cm: float = 0.03

    def __post_init__(self) -> None:
        if not 0 <= self.near < self.far <= 1 or not 5 < self.half_angle_deg < 80:
            raise ConfigError(
                f"fan near={self.near}, far={self.far}, half angle {self.half_angle_deg} deg",
                expected="0 <= near < far <= 1 and a half angle between 5 and 80 degrees",
            )


@dataclass
class USCine:
    """A rendered cine and its answers (arrays ``(T, rows, columns)`` in screen pixels).

    Attributes:
        frames: stored frames, uint8.
        chamber: the target per frame, bool.
        fan: the sector, bool ``(rows, columns)``.
        box: the region's inclusive box ``(x0, y0, x1, y1)`` (columns, rows): the fan's bounding box.
    """

    frames: np.ndarray
    chamber: np.ndarray
    fan: np.ndarray
    box: tuple[int, int, int, int]


def _fan(settings: USSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fan, depth, angle)``: the sector mask and each pixel's polar coordinates about the apex."""
    rows, cols = settings.rows, settings.columns
    r, c = np.meshgrid(
        np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64) - (cols - 1) / 2, indexing="ij"
    )
    depth = np.hypot(r, c) / rows
    angle = np.degrees(np.arctan2(c, r))
    fan = (depth >= settings.near) & (depth <= settings.far) & (np.abs(angle) <= settings.half_angle_deg)
    return fan, depth, angle


def _box(fan: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(fan.any(axis=1))
    cols = np.flatnonzero(fan.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def render_us_cine(settings: USSettings, seed: int) -> USCine:
    """Render one cine (see the module docstring); the same ``seed`` gives the same cine."""
    rng = np.random.default_rng(seed)
    rows, cols = settings.rows, settings.columns
    fan, depth, angle = _fan(settings)
    box = _box(fan)
    # The chamber: an ellipse well inside the fan, at a random depth / angle, beating over the cine.
    d0 = rng.uniform(0.35, 0.65)
    a0 = np.radians(rng.uniform(-0.4, 0.4) * settings.half_angle_deg)
    centre = (d0 * rows * np.cos(a0), (cols - 1) / 2 + d0 * rows * np.sin(a0))
    radii = (rng.uniform(0.10, 0.18) * rows, rng.uniform(0.10, 0.2) * rows)
    tilt = rng.uniform(0, np.pi)
    r, c = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    dr, dc = r - centre[0], c - centre[1]
    u = dr * np.cos(tilt) + dc * np.sin(tilt)
    v = -dr * np.sin(tilt) + dc * np.cos(tilt)
    tissue = ndimage.gaussian_filter(rng.standard_normal((rows, cols)), 6.0)
    tissue = 1.0 + 0.6 * tissue / (np.abs(tissue).max() + 1e-9)
    tissue *= np.exp(-1.2 * depth)  # attenuation with depth (before time-gain compensation evens part of it out)
    tissue *= 1.0 + 0.8 * depth
    frames = np.zeros((settings.frames, rows, cols), dtype=np.uint8)
    chamber = np.zeros((settings.frames, rows, cols), dtype=bool)
    for t in range(settings.frames):
        scale = 1.0 + settings.beat_fraction * np.sin(2 * np.pi * t / settings.frames)
        rho = np.sqrt((u / (radii[0] * scale)) ** 2 + (v / (radii[1] * scale)) ** 2)
        inside = (rho <= 1.0) & fan
        echo = tissue * np.where(rho <= 1.0, 0.08, 1.0) * (1.0 + 1.5 * np.exp(-(((rho - 1.05) / 0.06) ** 2)))
        field = rng.standard_normal((2, rows, cols))
        field = np.stack([ndimage.gaussian_filter(f, settings.speckle_px) for f in field])
        speckle = np.hypot(field[0], field[1])
        speckle /= speckle.mean()
        amplitude = echo * speckle
        db = 20 * np.log10(amplitude + 1e-3)
        grey = np.clip((db + 30.0) / 40.0 * 255.0, 0, 255)  # 40 dB dynamic range, 8 bit
        frames[t] = np.where(fan, grey, 0).astype(np.uint8)
        chamber[t] = inside
    # Screen graphics outside the region: a grey bar at the right and depth ticks at the left.
    bar_rows = slice(rows // 6, rows - rows // 6)
    frames[:, bar_rows, cols - 6 : cols - 2] = np.linspace(255, 0, bar_rows.stop - bar_rows.start)[None, :, None]
    frames[:, :: max(rows // 10, 2), 1:4] = 200
    return USCine(frames, chamber, fan, box)


def write_us_dicom(path: str | Path, cine: USCine, pixel_cm: float = 0.03, frame_time_ms: float = 33.3) -> Path:
    """Write ``cine`` as a US Multi-frame Image (MONOCHROME2) with one 2D tissue region (the fan's box, in cm)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = phantom_cine_dataset(US_MULTIFRAME_STORAGE, "US", cine.frames.shape, bits=8, frame_time_ms=frame_time_ms)
    cols = cine.frames.shape[2]
    x0, y0, x1, y1 = cine.box
    item = Dataset()
    item.RegionSpatialFormat = 1
    item.RegionDataType = 1
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    item.PhysicalUnitsXDirection, item.PhysicalUnitsYDirection = 3, 3
    item.PhysicalDeltaX, item.PhysicalDeltaY = float(pixel_cm), float(pixel_cm)
    item.ReferencePixelX0, item.ReferencePixelY0 = (cols - 1) // 2 - x0, 0
    ds.SequenceOfUltrasoundRegions = DicomSequence([item])
    ds.PixelData = np.ascontiguousarray(cine.frames, dtype=np.uint8).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_us_dataset(
    root: str | Path, n_train: int = 12, n_heldout: int = 3, settings: USSettings | None = None, seed: int = 0
) -> tuple[Path, Path]:
    """Write the ultrasound demo's cines and datasets under ``root``.

    Layout: ``cines/{case}.dcm`` (every cine as DICOM), ``train/`` (paired: ``images/`` the cines read back through
    :func:`medseg.io.load_image`, cropped to the region, ``(1, X, Y, T)``; ``labels/`` the chamber on that grid;
    ``dataset.yaml``) and ``heldout/`` (the DICOM cines' paths and full-screen truth masks, ``truth/{case}.npy``
    ``(X, Y, T)``, listed in ``truth.json``).

    Returns:
        ``(train_root, heldout_root)``.
    """
    root = Path(root)
    settings = settings or USSettings()
    train_root, heldout_root = root / "train", root / "heldout"
    truth = {}
    for i in range(n_train + n_heldout):
        case = f"us_{i:03d}"
        cine = render_us_cine(settings, seed * 1000 + i)
        dicom = write_us_dicom(root / "cines" / f"{case}.dcm", cine, settings.pixel_cm)
        full = np.ascontiguousarray(cine.chamber.transpose(2, 1, 0))  # (T, rows, cols) -> (X, Y, T)
        if i < n_train:
            image = load_image(dicom)
            x0, y0, x1, y1 = (int(v) for v in image.meta["crop_box"])
            label = full[x0 : x1 + 1, y0 : y1 + 1]
            save_image(image, train_root / "images" / f"{case}.nii.gz")
            save_mask(torch.from_numpy(label.astype(np.uint8)), image, train_root / "labels" / f"{case}.nii.gz")
        else:
            (heldout_root / "truth").mkdir(parents=True, exist_ok=True)
            np.save(heldout_root / "truth" / f"{case}.npy", full.astype(np.uint8))
            truth[case] = {"dicom": str(dicom), "truth": str(heldout_root / "truth" / f"{case}.npy"), "box": cine.box}
    (train_root / "dataset.yaml").write_text("name: us_chamber\nlabels: {0: background, 1: chamber}\nmodality: US\n")
    heldout_root.mkdir(parents=True, exist_ok=True)
    (heldout_root / "truth.json").write_text(json.dumps(truth, indent=2))
    logger.info("wrote %d training and %d held-out ultrasound cines under %s", n_train, n_heldout, root)
    return train_root, heldout_root
