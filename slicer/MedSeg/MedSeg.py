"""MedSeg: segment the loaded volume with a model served by ``medseg serve``, inside 3D Slicer.

The four classes Slicer looks for by name: :class:`MedSeg` (module metadata), :class:`MedSegWidget` (the panel,
``Resources/UI/MedSeg.ui``), :class:`MedSegLogic` (everything the panel does, usable from Slicer's Python console)
and :class:`MedSegTest` (a self-test that segments a volume on a live server). HTTP and the scene conversions live in
``MedSegLib`` (``client``: standard library only; ``scene``: numpy + MRML), which is tested without Slicer.

Server settings (URL, API key, TLS verification, timeout, user name) are kept in Slicer's settings under
``MedSeg/``; the API key and password are never logged.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ctk  # noqa: F401 (imported so the .ui file's ctk widgets are registered)
import qt
from MedSegLib.client import JobStatus, MedSegClient, MedSegServerError, ModelInfo, Result
from MedSegLib.scene import (
    label_statistics,
    markups_prompts,
    read_nrrd,
    segmentation_from_labelmap,
    volume_array,
    volume_node_to_nrrd,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import slicer

logger = logging.getLogger(__name__)

SETTINGS = "MedSeg"
DEFAULT_URL = "http://127.0.0.1:8000"
#: Inputs with more voxels than this go through a job (progress bar, Cancel); smaller ones use synchronous predict.
SYNC_MAX_VOXELS = 256 * 256 * 64


class MedSeg(ScriptedLoadableModule):
    """Module metadata shown by Slicer."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["medseg contributors"]
        self.parent.helpText = (
            "Segment the selected volume with a model served by a medseg server (<code>medseg serve</code>). "
            "Choose the server and a model, pick the volume, place a box or points for prompted models, and press "
            "Segment. The result comes back as a segmentation with the model's label names."
        )
        self.parent.acknowledgementText = "medseg is built on MONAI and PyTorch."


class MedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The MedSeg panel: server settings, model card, input volume, prompts, Segment / Cancel, statistics."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedSegLogic | None = None
        self.models: dict[str, ModelInfo] = {}
        self._cancel_requested = False
        self._busy = False

    # -- setup -------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MedSeg.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        for selector in (
            self.ui.inputVolumeSelector,
            self.ui.roiSelector,
            self.ui.includePointsSelector,
            self.ui.excludePointsSelector,
        ):
            selector.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSegLogic()

        self.ui.apiKeyLineEdit.setEchoMode(qt.QLineEdit.Password)
        self.ui.passwordLineEdit.setEchoMode(qt.QLineEdit.Password)
        self.ui.statisticsTable.setColumnCount(4)
        self.ui.statisticsTable.setHorizontalHeaderLabels(["Segment", "Label", "Voxels", "Volume (mL)"])
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self.ui.cancelButton.enabled = False
        self._load_settings()

        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.placeRoiButton.connect("clicked(bool)", lambda: self.onPlace("vtkMRMLMarkupsROINode", "roiSelector"))
        self.ui.placeIncludeButton.connect(
            "clicked(bool)", lambda: self.onPlace("vtkMRMLMarkupsFiducialNode", "includePointsSelector")
        )
        self.ui.placeExcludeButton.connect(
            "clicked(bool)", lambda: self.onPlace("vtkMRMLMarkupsFiducialNode", "excludePointsSelector")
        )
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        for line_edit in (self.ui.serverUrlLineEdit, self.ui.apiKeyLineEdit, self.ui.usernameLineEdit):
            line_edit.connect("editingFinished()", self._save_settings)
        self.ui.verifyTlsCheckBox.connect("toggled(bool)", self._save_settings)
        self.ui.timeoutSpinBox.connect("valueChanged(int)", self._save_settings)
        self.onModelChanged()

    def cleanup(self) -> None:
        self.removeObservers()

    # -- settings ----------------------------------------------------------------------------------------------------

    def _load_settings(self) -> None:
        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value(f"{SETTINGS}/serverUrl", DEFAULT_URL)
        self.ui.apiKeyLineEdit.text = settings.value(f"{SETTINGS}/apiKey", "")
        self.ui.usernameLineEdit.text = settings.value(f"{SETTINGS}/username", "")
        self.ui.verifyTlsCheckBox.checked = str(settings.value(f"{SETTINGS}/verifyTls", "true")).lower() == "true"
        self.ui.timeoutSpinBox.value = int(settings.value(f"{SETTINGS}/timeoutS", 60))

    def _save_settings(self, *_: Any) -> None:
        settings = qt.QSettings()
        settings.setValue(f"{SETTINGS}/serverUrl", self.ui.serverUrlLineEdit.text.strip())
        settings.setValue(f"{SETTINGS}/apiKey", self.ui.apiKeyLineEdit.text)
        settings.setValue(f"{SETTINGS}/username", self.ui.usernameLineEdit.text.strip())
        settings.setValue(f"{SETTINGS}/verifyTls", "true" if self.ui.verifyTlsCheckBox.checked else "false")
        settings.setValue(f"{SETTINGS}/timeoutS", int(self.ui.timeoutSpinBox.value))

    def _connect(self) -> MedSegClient:
        self._save_settings()
        return self.logic.connect(
            self.ui.serverUrlLineEdit.text,
            api_key=self.ui.apiKeyLineEdit.text,
            username=self.ui.usernameLineEdit.text,
            password=self.ui.passwordLineEdit.text,
            verify_tls=self.ui.verifyTlsCheckBox.checked,
            timeout_s=self.ui.timeoutSpinBox.value,
        )

    # -- actions -----------------------------------------------------------------------------------------------------

    def _show_error(self, exc: Exception, what: str) -> None:
        text = exc.message() if isinstance(exc, MedSegServerError) else str(exc)
        self.ui.statusLabel.text = f"{what} failed"
        logger.warning("%s failed: %s", what, text.replace("\n", " "))
        slicer.util.errorDisplay(f"{what} failed.\n\n{text}", windowTitle="MedSeg")

    def onTestConnection(self) -> None:
        self.ui.connectionStatusLabel.text = "Connecting..."
        slicer.app.processEvents()
        try:
            client = self._connect()
            models = self.logic.run_in_thread(client.test_connection)
        except (MedSegServerError, ValueError) as exc:
            self.ui.connectionStatusLabel.text = "Not connected"
            self._show_error(exc, "Connecting to the server")
            return
        self.models = {m.name: m for m in models}
        current = self.ui.modelComboBox.currentText
        self.ui.modelComboBox.clear()
        for name in self.models:
            self.ui.modelComboBox.addItem(name)
        if current in self.models:
            self.ui.modelComboBox.setCurrentText(current)
        self.ui.connectionStatusLabel.text = f"Connected: {len(models)} model(s)"
        self.onModelChanged()

    def onModelChanged(self, *_: Any) -> None:
        name = self.ui.modelComboBox.currentText
        info = self.models.get(name)
        if info is not None and self.logic.client is not None:
            try:
                info = self.logic.client.get_model(name)  # the full card (needs_prompts, roi_size, ...)
                self.models[name] = info
            except MedSegServerError as exc:
                self._show_error(exc, f"Reading the card of {name}")
        self.ui.modelCardLabel.text = info.describe() if info is not None else "Test the connection to list models."
        self.ui.promptsCollapsibleButton.enabled = info is not None and info.needs_prompts
        self.ui.promptsCollapsibleButton.collapsed = not (info is not None and info.needs_prompts)
        self.updateButtons()

    def updateButtons(self, *_: Any) -> None:
        ready = self.ui.inputVolumeSelector.currentNode() is not None and self.ui.modelComboBox.currentText != ""
        self.ui.segmentButton.enabled = ready and not self._busy
        self.ui.cancelButton.enabled = self._busy

    def onPlace(self, class_name: str, selector_name: str) -> None:
        """Select (or create) the Markups node of ``selector_name`` and enter place mode for it."""
        selector = getattr(self.ui, selector_name)
        node = selector.currentNode()
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(class_name)
            selector.setCurrentNode(node)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(class_name)
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(1 if class_name.endswith("FiducialNode") else 0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def onCancel(self) -> None:
        self._cancel_requested = True
        self.ui.statusLabel.text = "Cancelling..."

    def _progress(self, status: JobStatus) -> None:
        self.ui.progressBar.setValue(int(round(100 * status.progress)))
        self.ui.statusLabel.text = f"Job {status.state} ({100 * status.progress:.0f} %)"

    def onSegment(self) -> None:
        volume = self.ui.inputVolumeSelector.currentNode()
        name = self.ui.modelComboBox.currentText
        info = self.models.get(name)
        if volume is None or info is None:
            return
        self._busy, self._cancel_requested = True, False
        self.updateButtons()
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = "Uploading..."
        try:
            client = self.logic.client or self._connect()
            prompts = None
            if info.needs_prompts:
                prompts = markups_prompts(
                    self.ui.roiSelector.currentNode(),
                    self.ui.includePointsSelector.currentNode(),
                    self.ui.excludePointsSelector.currentNode(),
                )
            outcome = self.logic.segment(
                client,
                volume,
                info,
                prompts=prompts,
                tta=self.ui.ttaCheckBox.checked,
                use_job=self.ui.alwaysUseJobsCheckBox.checked or None,
                on_progress=self._progress,
                should_cancel=lambda: self._cancel_requested,
            )
        except (MedSegServerError, ValueError) as exc:
            self._show_error(exc, "Segmentation")
            outcome = None
        finally:
            self._busy = False
            self.updateButtons()
        if outcome is None:
            if self._cancel_requested:
                self.ui.statusLabel.text = "Cancelled"
            return
        segmentation, rows = outcome
        self.ui.progressBar.setValue(100)
        self.ui.statusLabel.text = f"Done: {segmentation.GetName()}"
        self.ui.statisticsTable.setRowCount(len(rows))
        for row, (label, value, voxels, volume_ml) in enumerate(rows):
            for column, text in enumerate((label, str(value), str(voxels), f"{volume_ml:.3f}")):
                self.ui.statisticsTable.setItem(row, column, qt.QTableWidgetItem(text))


class MedSegLogic(ScriptedLoadableModuleLogic):
    """What the panel does, callable from Slicer's Python console::

    logic = slicer.modules.MedSegWidget.logic  # or MedSegLogic()
    client = logic.connect("http://127.0.0.1:8000", api_key="...")
    segmentation, rows = logic.segment(client, volumeNode, client.get_model("tiny"))
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.client: MedSegClient | None = None

    def connect(
        self,
        url: str,
        *,
        api_key: str = "",
        username: str = "",
        password: str = "",
        verify_tls: bool = True,
        timeout_s: float = 60.0,
    ) -> MedSegClient:
        """A client for ``url`` with an API key, or a token from the user name and password."""
        client = MedSegClient(url, api_key=api_key or None, timeout_s=timeout_s, verify_tls=verify_tls)
        if not api_key and username:
            self.run_in_thread(lambda: client.login(username, password))
        self.client = client
        return client

    @staticmethod
    def run_in_thread(call: Callable[[], Any], poll_s: float = 0.05) -> Any:
        """Run a blocking call (HTTP) off the GUI thread while Slicer keeps repainting; re-raise its error."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:  # handed to the GUI thread below
                box["error"] = exc

        thread = threading.Thread(target=target, name="MedSeg-request", daemon=True)
        thread.start()
        while thread.is_alive():
            slicer.app.processEvents()
            time.sleep(poll_s)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def segment(
        self,
        client: MedSegClient,
        volume: Any,
        model: ModelInfo,
        *,
        prompts: dict[str, Any] | None = None,
        tta: bool | None = None,
        use_job: bool | None = None,
        on_progress: Callable[[JobStatus], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> tuple[Any, list[tuple[str, int, int, float]]] | None:
        """Upload ``volume``, segment it with ``model`` and add the result as a segmentation node.

        Args:
            client: a connected client.
            volume: a scalar volume node.
            model: the model (its full card, for ``needs_prompts``).
            prompts: prompt JSON for prompted models (:func:`MedSegLib.scene.markups_prompts`).
            tta: flip test-time augmentation (None: the model's default).
            use_job: True: always a job; None: a job for inputs over ``SYNC_MAX_VOXELS``; False: synchronous.
            on_progress: job status callback (progress bar).
            should_cancel: polled while a job runs; True cancels it.

        Returns:
            ``(segmentation node, statistics rows (name, value, voxels, mL))``, or None when cancelled.
        """
        if model.needs_prompts and not prompts:
            raise ValueError(f"model {model.name!r} needs a box (ROI) or include points; place them first")
        with tempfile.TemporaryDirectory(prefix="medseg-") as tmp:
            upload = volume_node_to_nrrd(volume, Path(tmp) / f"{_safe_name(volume.GetName())}.nrrd")
            if use_job is None:
                use_job = volume_array(volume).size > SYNC_MAX_VOXELS
            if use_job:
                result = self._run_job(client, model.name, upload, prompts, tta, on_progress, should_cancel)
            else:
                result = self.run_in_thread(
                    lambda: client.predict(model.name, upload, output="nrrd", prompts=prompts, tta=tta)
                )
            if result is None or (should_cancel is not None and should_cancel()):
                return None
            mask = read_nrrd(result.save(Path(tmp) / "result.nrrd"))
        names = result.label_names or model.label_names
        segmentation = segmentation_from_labelmap(
            slicer.mrmlScene, mask, names, volume, name=f"{volume.GetName()} {model.name}"
        )
        return segmentation, label_statistics(mask, names)

    def _run_job(
        self,
        client: MedSegClient,
        model: str,
        upload: Path,
        prompts: dict[str, Any] | None,
        tta: bool | None,
        on_progress: Callable[[JobStatus], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> Result | None:
        """Submit (upload off the GUI thread), poll with the GUI alive, fetch; None when cancelled."""
        job_id = self.run_in_thread(lambda: client.submit_job(model, upload, output="nrrd", prompts=prompts, tta=tta))
        status = client.wait_job(job_id, on_progress=on_progress, should_cancel=should_cancel, sleep=_processing_sleep)
        if status.state == "cancelled":
            return None
        if status.state != "done":
            raise MedSegServerError(
                None, "JobFailed", f"job {job_id} failed: {status.error or 'no reason given'}", "see the server log"
            )
        return self.run_in_thread(lambda: client.job_result(job_id))


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60] or "volume"


def _processing_sleep(seconds: float) -> None:
    """Wait between job polls while the GUI stays responsive."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.02)


class MedSegTest(ScriptedLoadableModuleTest):
    """Self-test against a live server (``Slicer --testing``): a phantom volume in, named segments back.

    Environment: ``MEDSEG_SLICER_TEST_URL`` (server URL; without it the server part is skipped),
    ``MEDSEG_SLICER_TEST_KEY`` (API key), ``MEDSEG_SLICER_TEST_MODEL`` (default ``tiny``),
    ``MEDSEG_SLICER_TEST_VOLUME`` (a volume file to segment instead of the phantom) and
    ``MEDSEG_SLICER_TEST_REFERENCE`` (a reference mask NRRD on that volume's grid; the result must match it).
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_scene_conversions()
        self.setUp()
        self.test_segment_on_server()

    def _phantom(self) -> Any:
        import numpy as np

        grid = np.stack(np.meshgrid(*[np.arange(n) for n in (36, 28, 32)], indexing="ij"), -1)
        image = np.full((36, 28, 32), 0.2, np.float32)
        image[np.linalg.norm(grid - (18, 14, 16), axis=-1) < 7] += 1.0
        image[3:9, 4:10, 4:10] += 0.5
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedSegPhantom")
        volume.SetSpacing(1.2, 1.0, 1.5)
        volume.SetOrigin(-20.0, 15.0, 7.5)
        slicer.util.updateVolumeFromArray(volume, image)
        return volume

    def test_scene_conversions(self) -> None:
        """A volume written for upload reads back with its geometry; a mask becomes named segments."""
        import numpy as np
        from MedSegLib.scene import NrrdVolume, node_world_ijk_to_ras

        self.delayDisplay("Scene conversions")
        volume = self._phantom()
        with tempfile.TemporaryDirectory() as tmp:
            back = read_nrrd(volume_node_to_nrrd(volume, Path(tmp) / "v.nrrd"))
        self.assertTrue(np.allclose(back.ijk_to_ras, node_world_ijk_to_ras(volume)))
        self.assertTrue(np.array_equal(back.array, slicer.util.arrayFromVolume(volume)))
        mask = NrrdVolume((back.array > 0.5).astype(np.uint8), back.ijk_to_ras)
        segmentation = segmentation_from_labelmap(slicer.mrmlScene, mask, ["background", "bright"], volume)
        self.assertEqual(segmentation.GetSegmentation().GetNthSegment(0).GetName(), "bright")
        self.delayDisplay("Scene conversions passed")

    def test_segment_on_server(self) -> None:
        """Segment a volume on the server and compare with the model's labels (and a reference mask if given)."""
        import numpy as np

        url = os.environ.get("MEDSEG_SLICER_TEST_URL")
        if not url:
            self.delayDisplay("MEDSEG_SLICER_TEST_URL is not set: skipping the server test")
            return
        logic = MedSegLogic()
        client = logic.connect(url, api_key=os.environ.get("MEDSEG_SLICER_TEST_KEY", ""))
        model = client.get_model(os.environ.get("MEDSEG_SLICER_TEST_MODEL", "tiny"))
        path = os.environ.get("MEDSEG_SLICER_TEST_VOLUME")
        volume = slicer.util.loadVolume(path) if path else self._phantom()
        self.delayDisplay(f"Segmenting with {model.name} on {url}")
        for use_job in (False, True):
            outcome = logic.segment(client, volume, model, use_job=use_job)
            self.assertIsNotNone(outcome)
            segmentation, rows = outcome
            segments = segmentation.GetSegmentation()
            names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
            self.assertEqual(names, list(model.label_names[1:]))
            self.assertEqual([r[0] for r in rows], names)
        reference = os.environ.get("MEDSEG_SLICER_TEST_REFERENCE")
        if reference:
            expected = read_nrrd(reference).array
            labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            slicer.modules.segmentations.logic().ExportAllSegmentsToLabelmapNode(segmentation, labelmap, 0)
            got = slicer.util.arrayFromVolume(labelmap)
            self.assertEqual(got.shape, expected.shape)
            self.assertGreaterEqual(float(np.mean(got == expected)), 0.99)
        self.delayDisplay("Server test passed")
