"""End to end through nnU-Net v2 on CPU: export -> fingerprint/plan/preprocess -> a tiny STU-Net training ->
nnU-Net's validation -> prediction through ``NnUNetResultsPredictor``, checked voxel for voxel against nnU-Net's own
outputs and against the input's geometry. Also nnU-Net's own predict command with medseg's trainer, and weights that
do not fit the plans."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.integrations.nnunet import NnUNetResultsPredictor, NnUNetRunSettings, run_nnunet
from medseg.io import load_image, save_image
from tests.helpers import write_msd

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV_BEFORE = os.environ.get("nnUNet_raw")
TINY_BUDGET = NnUNetRunSettings(
    val_iterations_per_epoch=1, num_processes=1, augmentation_processes=0, validate=True, max_features=16
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(dataset, work dir, results folder) of a 2-epoch x 3-iteration STU-Net (widths 4..64) training, fold 0."""
    tmp = tmp_path_factory.mktemp("nnunet")
    data = write_msd(tmp / "msd", n_cases=5)
    folder = run_nnunet(
        data,
        tmp / "work",
        model="stunet_tiny",
        dataset_id=501,
        fold=0,
        epochs=2,
        iterations_per_epoch=3,
        device="cpu",
        settings=TINY_BUDGET,
    )
    return data, tmp / "work", folder


def test_training_writes_an_nnunet_results_folder(trained: tuple[Path, Path, Path]) -> None:
    _, work, folder = trained
    assert folder == work / "nnUNet_results" / "Dataset501_tiny" / "STUNetTrainer_tiny__nnUNetPlans__3d_fullres"
    for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth", "fold_0/validation/summary.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "fold_0" / "debug.json").read_text())["num_epochs"] == "2"
    assert os.environ.get("nnUNet_raw") == ENV_BEFORE  # the runner restored the environment


def test_predictor_matches_nnunet_validation_on_the_input_grid(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, _, folder = trained
    predictor = NnUNetResultsPredictor.from_folder(folder, fold=0, device="cpu")
    card = predictor.card
    assert (card.in_channels, card.out_channels) == (1, 3)
    assert predictor.label_names == card.label_names == ("background", "sphere", "box")
    plans = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert card.roi_size == tuple(plans["patch_size"][::-1])  # nnU-Net (z, y, x) -> medseg (X, Y, Z)

    # nnU-Net's final validation predicted the fold's validation case from its preprocessed data, with mirroring,
    # and wrote it through SimpleITK; we start from the raw image as medseg loads it.
    (reference,) = sorted((folder / "fold_0" / "validation").glob("*.nii.gz"))
    case = reference.name.removesuffix(".nii.gz")
    image = load_image(data / "imagesTr" / f"{case}.nii.gz")
    result = predictor.predict(image, tta=True, keep_probabilities=True)
    assert result.mask.shape == image.shape[1:]
    np.testing.assert_array_equal(np.asarray(result.mask.affine), np.asarray(image.affine))
    nnunet_mask = load_image(reference)
    np.testing.assert_allclose(np.asarray(nnunet_mask.affine), np.asarray(image.affine), atol=1e-5)
    np.testing.assert_array_equal(result.mask.numpy(), nnunet_mask.numpy()[0].astype(np.uint8))
    assert result.probabilities is not None and result.probabilities.shape == (3, *image.shape[1:])
    # float16 probabilities (half the memory of float32): the sums are 1 to float16 precision
    torch.testing.assert_close(result.probabilities.float().sum(0), torch.ones(image.shape[1:]), atol=3e-3, rtol=0)
    assert [s.name for s in result.stats] == ["sphere", "box"]

    # The same image stored as NRRD (LPS on disk, read back to the same RAS grid) gives the same mask.
    nifti = predictor.predict(data / "imagesTr" / f"{case}.nii.gz", tta=False)
    nrrd = predictor.predict(save_image(image, tmp_path / f"{case}.nrrd"), tta=False)
    np.testing.assert_array_equal(nrrd.mask.numpy(), nifti.mask.numpy())
    np.testing.assert_allclose(np.asarray(nrrd.mask.affine), np.asarray(image.affine), atol=1e-6)
    with pytest.raises(ModelInputError, match="2 channel.* takes 1; expected \\(C=1, X, Y, Z\\)"):
        predictor.predict(MetaTensor(torch.cat([image.as_tensor()] * 2), affine=image.affine))


def test_nnunet_predict_command_with_medseg_trainer_agrees(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """``nnUNetv2_predict -tr STUNetTrainer_tiny`` (through medseg's wrapper) finds the trainer and gives our mask."""
    data, work, folder = trained
    (tmp_path / "in").mkdir()
    shutil.copy(work / "nnUNet_raw" / "Dataset501_tiny" / "imagesTr" / "case_03_0000.nii.gz", tmp_path / "in")
    args = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "501", "-c", "3d_fullres", "-f", "0"]
    args += ["-tr", "STUNetTrainer_tiny", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    code = f"from medseg.integrations.nnunet.native import nnunet_predict_main; nnunet_predict_main({args!r})"
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"))
    env.update(nnUNet_results=str(work / "nnUNet_results"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nnunet_mask = load_image(tmp_path / "out" / "case_03.nii.gz")
    case = data / "imagesTr" / "case_03.nii.gz"
    reference = nnunet_mask.numpy()[0].astype(np.uint8)
    # nnUNetPredictor end to end: the same mask, voxel for voxel.
    native = NnUNetResultsPredictor.from_folder(folder, device="cpu", engine=False).predict(case, tta=False)
    np.testing.assert_array_equal(native.mask.numpy(), reference)
    # medseg's engine: the same windows, nnU-Net's float16 Gaussian and weight sums, the same export: the same mask.
    ours = NnUNetResultsPredictor.from_folder(folder, device="cpu").predict(case, tta=False)
    np.testing.assert_array_equal(ours.mask.numpy(), reference)


def test_weights_that_do_not_fit_the_plans_are_listed(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, folder = trained
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("validation", "*.png", "*.txt", "checkpoint_best*"))
    meta = json.loads((copy / "dataset.json").read_text())
    meta["labels"]["extra"] = 3
    (copy / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(
        WeightsError,
        match=r"10 mis-shaped: seg_outputs\.0\.weight \(3, 64, 1, 1, 1\)≠\(4, 64, 1, 1, 1\).*hint: .*dataset\.json",
    ):
        NnUNetResultsPredictor.from_folder(copy)


@pytest.fixture(scope="module")
def plain_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, results folder) of nnU-Net's own PlainConvUNet (features capped at 16), 1 epoch x 2 iterations."""
    tmp = tmp_path_factory.mktemp("nnunet_plain")
    data = write_msd(tmp / "msd", n_cases=5)
    settings = dataclasses.replace(TINY_BUDGET, validate=False)
    folder = run_nnunet(
        data, tmp / "work", model="nnunet", dataset_id=502, fold=0, epochs=1, iterations_per_epoch=2,
        device="cpu", settings=settings,
    )  # fmt: skip
    return data, folder


def test_engine_with_the_channels_last_forward_agrees_with_nnunet(
    plain_trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nnU-Net's default network goes through the engine's channels-last forward (float32 rounding, not bit for
    bit): the mask agrees with ``nnUNetPredictor``'s for the same weights, with and without mirroring."""
    from medseg.integrations.nnunet import lean

    stages = []
    decoder_stage = lean._decoder_stage
    monkeypatch.setattr(lean, "_decoder_stage", lambda *a: stages.append(a[3]) or decoder_stage(*a))
    data, folder = plain_trained
    case = data / "imagesTr" / "case_01.nii.gz"
    native = NnUNetResultsPredictor.from_folder(folder, device="cpu", engine=False)
    ours = NnUNetResultsPredictor.from_folder(folder, device="cpu", precision="fp32")
    assert ours.engine is not None and type(ours.engine.model.networks[0]).__name__ == "PlainConvUNet"
    for tta in (False, True):
        reference = native.predict(case, tta=tta).mask.numpy()
        got = ours.predict(case, tta=tta).mask.numpy()
        assert got.shape == reference.shape
        assert (got == reference).mean() >= 0.999, (tta, (got == reference).mean())
    assert stages and all(stages)  # the decoder ran channels-last


def test_a_mirror_subset_is_the_same_subset_in_both_predictors(plain_trained: tuple[Path, Path]) -> None:
    """``tta_axes="x"``: two passes, mirrored over the image's first voxel axis, through the engine and through
    ``nnUNetPredictor`` alike; an axis the checkpoint does not mirror is refused when the folder is opened."""
    data, folder = plain_trained
    case = data / "imagesTr" / "case_02.nii.gz"
    ours = NnUNetResultsPredictor.from_folder(folder, device="cpu", precision="fp32", tta_axes="x")
    native = NnUNetResultsPredictor.from_folder(folder, device="cpu", engine=False, tta_axes="x")
    assert ours.engine is not None and len(ours.engine.mirror_axes) == 1
    assert tuple(native._predictor.allowed_mirroring_axes) == ours.engine.mirror_axes
    reference = native.predict(case, tta=True, keep_probabilities=True)
    got = ours.predict(case, tta=True).mask.numpy()
    assert (got == reference.mask.numpy()).mean() >= 0.999
    full = NnUNetResultsPredictor.from_folder(folder, device="cpu", engine=False)
    every = full.predict(case, tta=True, keep_probabilities=True).probabilities
    assert every is not None and reference.probabilities is not None
    assert not torch.allclose(every, reference.probabilities)  # one axis is not all three: the option took effect
    with pytest.raises(ConfigError, match="--tta-axes"):
        NnUNetResultsPredictor.from_folder(folder, device="cpu", tta_axes="w")


def test_probabilities_to_files_equal_those_in_memory(plain_trained: tuple[Path, Path], tmp_path: Path) -> None:
    """nnU-Net folders write per-class probability files through the engine (nnU-Net's transposed grid viewed
    onto the files' (X, Y, Z) arrays): the same values as ``keep_probabilities``, on the input's affine."""
    import nibabel as nib

    from medseg.inference.gridmap import ProbabilityOutput
    from pipelines.predict import PredictSettings
    from pipelines.predict import predict as run_predict

    data, folder = plain_trained
    case = data / "imagesTr" / "case_03.nii.gz"
    image = load_image(case)
    ours = NnUNetResultsPredictor.from_folder(folder, device="cpu", precision="fp32")
    kept = ours.predict(image, tta=False, keep_probabilities=True)
    assert kept.probabilities is not None
    for dtype in ("float16", "uint8"):
        result = ours.predict(image, tta=False, probabilities_out=ProbabilityOutput(tmp_path / dtype / "p", dtype))
        np.testing.assert_array_equal(result.mask.numpy(), kept.mask.numpy())
        meta = json.loads((tmp_path / dtype / "p.json").read_text())
        assert meta["shape"] == list(image.shape[1:])
        np.testing.assert_allclose(meta["affine"], np.asarray(image.affine), atol=1e-6)
        for c, name in enumerate(ours.label_names):
            path = tmp_path / dtype / meta["files"][name]
            expected = kept.probabilities[c].float().numpy()
            if dtype == "float16":
                np.testing.assert_array_equal(np.load(path).astype(np.float32), expected)
            else:
                stored = nib.load(path)
                np.testing.assert_allclose(stored.affine, np.asarray(image.affine), atol=1e-5)
                np.testing.assert_allclose(stored.get_fdata(), expected, atol=0.5 / 255 + 1e-3)
    native = NnUNetResultsPredictor.from_folder(folder, device="cpu", engine=False)
    with pytest.raises(ConfigError, match="medseg's engine"):
        native.predict(image, probabilities_out=ProbabilityOutput(tmp_path / "n" / "p", "uint8"))
    # through `medseg predict --save-probabilities` (pipelines.predict)
    run_predict(folder, [case], tmp_path / "cli", PredictSettings(tta=False, save_probabilities="uint8"))
    stats = json.loads((tmp_path / "cli" / "case_03_seg.json").read_text())
    assert Path(stats["probabilities"]).is_file() and len(list((tmp_path / "cli").glob("case_03_prob_*.nii"))) == 3


def test_the_probability_view_follows_nnunets_reorientation_and_transpose() -> None:
    """The files' view equals the array nnU-Net is given (reoriented to RAS where its reader does, reversed to
    (z, y, x), transposed), and is a view of the file's array, not a copy."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    volume = rng.random((5, 6, 7)).astype(np.float32)
    affine = np.array([[0.0, 0.0, -2.0, 10.0], [-1.0, 0.0, 0.0, 5.0], [0.0, 1.5, 0.0, -3.0], [0.0, 0.0, 0.0, 1.0]])
    for reader in ("SimpleITKIO", "NibabelIOWithReorient"):
        for order in ((0, 1, 2), (2, 0, 1)):
            fake = SimpleNamespace(
                _reader=reader, _predictor=SimpleNamespace(plans_manager=SimpleNamespace(transpose_forward=order))
            )
            data, _, _ = NnUNetResultsPredictor._to_nnunet(
                fake, MetaTensor(torch.from_numpy(volume[None]), affine=affine)
            )  # type: ignore[arg-type]
            view = NnUNetResultsPredictor._grid_view(fake, affine)(volume)  # type: ignore[arg-type]
            assert np.shares_memory(view, volume)
            np.testing.assert_array_equal(view, data[0].transpose(order))
