"""The angiography and ultrasound demos: generated DICOM with known answers, and each demo end to end at a tiny size.

Dice thresholds of the end-to-end runs: at the tiny size (6 training runs, 45 optimiser steps) the held-out Dice
measured 0.94 (angiography) and 0.93 (ultrasound). Trivial answers score far lower: "everything is vessel" 0.18
(vessels cover about 10 % of a frame), "everything is chamber" about 0.15 on the full screen, "nothing" 0. A
threshold of 0.75 therefore fails any run whose training, frame-by-frame prediction or paste-back is broken, and
leaves room for the run-to-run spread of CPU training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.data.demo_us import USSettings, render_us_cine, write_us_dicom
from medseg.data.demo_xa import XASettings, render_xa_run, write_xa_dicom
from medseg.io import load_image
from medseg.io.modality import get_adapter
from pipelines.demo import TINY_DEMO, run_modality_demo

DICE_FLOOR = 0.75


def test_xa_run_has_known_mask_frames_shift_and_spacing(tmp_path: Path) -> None:
    settings = XASettings(rows=96, columns=96, frames=9, contrast_frame=3, shift=(0.6, -1.3))
    run = render_xa_run(settings, seed=5)
    assert np.array_equal(run.frames, render_xa_run(settings, seed=5).frames)  # reproducible
    image = load_image(write_xa_dicom(tmp_path / "run.dcm", run.frames, pixel_mm=0.3))
    meta = image.meta
    assert tuple(image.shape) == (1, 96, 96, 9)
    assert meta["mask_source"] == "auto" and meta["mask_frames"] == run.mask_frames == [1, 2]
    assert np.allclose(meta["mask_shifts"][-1], settings.shift, atol=0.1)  # registration finds the sub-pixel shift
    assert meta["spacing_calibrated"] and np.allclose(image.affine.diag()[:2].numpy(), 0.25)
    minip = load_image(tmp_path / "run.dcm", modality_options={"derive": "minip"})[0, :, :, 0].numpy()
    vessels = run.vessels.T
    assert minip[vessels].mean() < -0.2 < minip[~vessels].mean()  # vessels are dark after subtraction


def test_us_cine_is_cropped_to_its_fan_region_and_pasted_back(tmp_path: Path) -> None:
    settings = USSettings(rows=80, columns=100, frames=4)
    cine = render_us_cine(settings, seed=2)
    assert 0.02 < cine.chamber.mean() < 0.2 and not cine.chamber[:, ~cine.fan].any()
    image = load_image(write_us_dicom(tmp_path / "cine.dcm", cine, pixel_cm=0.03))
    x0, y0, x1, y1 = cine.box
    assert image.meta["crop_box"] == [x0, y0, x1, y1] and image.meta["cropped"]
    assert tuple(image.shape) == (1, x1 - x0 + 1, y1 - y0 + 1, 4)
    assert np.allclose(image.affine.diag()[:2].numpy(), 0.3)
    truth = cine.chamber.transpose(2, 1, 0)
    restored = get_adapter("ultrasound").restore_mask(truth[x0 : x1 + 1, y0 : y1 + 1], image.meta)
    assert np.array_equal(restored, truth)
    bar = cine.frames[0, :, -4]  # the screen's grey bar lies outside the region and is cropped away
    assert bar.max() > 200 and image.shape[1] < settings.columns - 4


@pytest.mark.parametrize("task", ["angiography", "ultrasound"])
def test_demo_end_to_end_tiny(tmp_path: Path, task: str) -> None:
    result = run_modality_demo(task, tmp_path / task, size=TINY_DEMO, show_progress=False)
    ev = result.evaluation
    assert len(ev["per_case"]) == TINY_DEMO.n_heldout and min(ev["per_case"].values()) > DICE_FLOOR, ev
    assert all(p.is_file() for p in result.overlays + result.masks)
    assert (result.run_dir / "checkpoints" / "best.pt").is_file()
    if task == "ultrasound":
        mask = load_image(result.masks[0])
        assert tuple(mask.shape[1:3]) != (TINY_DEMO.frame[1], TINY_DEMO.frame[0])  # saved on the cropped grid
