"""``SegmentationPredictor``: the one contract every kind of predictor fulfils.

Dense run directories (:class:`~medseg.inference.predictor.Predictor`), promptable SAM models
(:class:`~medseg.inference.prompted.PromptPredictor`) and nnU-Net v2 results folders
(``medseg.integrations.nnunet.results.NnUNetResultsPredictor``) all subclass it, and
:func:`medseg.open_predictor` returns it. Callers (CLI, jobs worker, REST routes, DICOMweb, MONAI Label) never
branch on the kind of model: they call :meth:`~SegmentationPredictor.check_input` (or let ``predict`` call it) and
``predict``. A dense model refuses prompts and a prompted one requires them, each in its own words.
Classification runs (:class:`~medseg.inference.classify.ClassificationPredictor`) share the card, label names and
input checks, but their answer is a class, not a mask: they add ``predict_class`` and their ``predict`` refuses
with a ``ModelInputError``; :attr:`SegmentationPredictor.task` tells the two apart.
See ``docs/architecture.md`` and ``docs/classification.md``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from monai.data import MetaTensor

from medseg.core.errors import ModelInputError
from medseg.inference.prediction import Prediction
from medseg.inference.prompts import PROMPTS_JSON_EXAMPLE, Prompts

if TYPE_CHECKING:
    from medseg.models import ModelCard

__all__ = ["PROMPT_USAGE", "Progress", "SegmentationPredictor", "image_name"]

#: ``progress(done, total)``: called by ``predict`` as the work advances (network windows or slices).
Progress = Callable[[int, int], None]

#: How prompts are given, for error messages (the CLI's flags and the server's JSON field).
PROMPT_USAGE = (
    "--box x0,y0,x1,y1[,z0,z1] and/or --point x,y[,z][:label] on the command line (--coords ras for RAS mm), "
    f"or the JSON field `prompts` like {PROMPTS_JSON_EXAMPLE}"
)


class SegmentationPredictor(ABC):
    """A trained segmentation model ready to segment whole images, whatever produced it.

    Subclasses set ``card`` and implement :meth:`predict`; they may narrow :meth:`check_image`.

    Attributes:
        card: the model card (channels, label names, ``needs_prompts``, ROI, preset, paper).
    """

    card: ModelCard

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the mask values 0..N-1 (a prompted model names its labels after the prompt objects)."""
        return self.card.label_names

    @property
    def task(self) -> str:
        """``"segmentation"`` or ``"classification"`` (the card's). A classification run opens as a
        :class:`~medseg.inference.classify.ClassificationPredictor`, which answers ``predict_class`` and refuses
        ``predict``; callers serving both kinds check this once."""
        return self.card.task

    @property
    def needs_prompts(self) -> bool:
        """Whether :meth:`predict` needs ``prompts`` (boxes / points)."""
        return bool(self.card.needs_prompts)

    @property
    def tta_default(self) -> bool:
        """Whether :meth:`predict` applies test-time augmentation when ``tta`` is not given."""
        return False

    def check_prompts(self, prompts: Prompts | None) -> None:
        """Refuse prompts for a dense model and require them for a prompted one.

        Raises:
            ModelInputError: naming the model and how prompts are (or are not) given.
        """
        given = prompts is not None and bool(prompts.objects)
        if self.needs_prompts and not given:
            raise ModelInputError(
                f"model {self.card.name!r} is prompted and needs a box and/or points", hint=PROMPT_USAGE
            )
        if not self.needs_prompts and prompts is not None:
            raise ModelInputError(
                f"model {self.card.name!r} does not take prompts",
                hint="drop --box / --point (the `prompts` field on the server) for this model",
            )

    def check_image(self, image: MetaTensor) -> None:
        """Refuse an image this model cannot segment: ``(C, X, Y, Z)`` with ``C = card.in_channels``; a 2D model
        (``card.spatial_dims == 2``) also takes a 2D image ``(C, X, Y)``, and segments ``(C, X, Y, T)`` frame by frame.

        Raises:
            ModelInputError: wrong dimensionality or channel count.
        """
        channels = self.card.in_channels
        planar = self.card.spatial_dims == 2
        layout = f"(C={channels}, X, Y) or (C={channels}, X, Y, Z|T)" if planar else f"(C={channels}, X, Y, Z)"
        if image.ndim != 4 and not (planar and image.ndim == 3):
            raise ModelInputError(f"{image_name(image)} has shape {tuple(image.shape)}", expected=layout)
        if image.shape[0] != channels:
            raise ModelInputError(
                f"{image_name(image)} has {image.shape[0]} channel(s) but model {self.card.name!r} takes {channels}",
                expected=layout,
                hint="give one file per channel in the order of training (e.g. case_0000, case_0001)",
            )

    def check_input(self, image: MetaTensor, prompts: Prompts | None = None) -> None:
        """Everything :meth:`predict` checks before running the network: prompts first, then the image.

        Raises:
            ModelInputError: in the model's own words.
        """
        self.check_prompts(prompts)
        self.check_image(image)

    @abstractmethod
    def predict(
        self,
        image: str | Path | MetaTensor,
        *,
        prompts: Prompts | None = None,
        tta: bool | None = None,
        keep_probabilities: bool = False,
        progress: Progress | None = None,
    ) -> Prediction:
        """Segment one image; the mask lies on the input's exact voxel grid.

        Args:
            image: a path readable by :func:`medseg.io.load_image` or a loaded ``MetaTensor (C, X, Y, Z)``.
            prompts: boxes / points, required by prompted models and refused by the others.
            tta: override the model's test-time augmentation default (ignored where it does not apply).
            keep_probabilities: also return the class probabilities ``(C_out, X, Y, Z)`` on the input grid.
            progress: called with ``(done, total)`` as the work advances.

        Returns:
            A :class:`~medseg.inference.prediction.Prediction`.

        Raises:
            ModelInputError: see :meth:`check_input`.
        """


def image_name(image: MetaTensor) -> str:
    """The file name an image was loaded from, for messages."""
    return Path(str(image.meta.get("filename_or_obj", "input image"))).name
