"""STU-Net trainers for nnU-Net v2 (2.8.x), building :class:`medseg.models.stunet.STUNet` from the plans.

The trainer family follows the official STU-Net v2.2 trainers (``docs/models/stunet.md``): ``STUNetTrainer`` (= base),
``STUNetTrainer_small|base|large|huge`` with nnU-Net's initial learning rate 1e-2, and ``STUNetTrainer_*_ft`` with
1e-3 for fine-tuning; everything else (1000 epochs x 250 iterations, SGD + Nesterov, PolyLR, Dice + CE with deep
supervision, nnU-Net augmentation) is nnU-Net's. ``STUNetTrainer_tiny`` (widths 4..64) exists for smoke tests and
CI only; it is not a paper configuration.

Written for nnunetv2 2.8.1, whose trainer and predictor call ``build_network_architecture(plans_manager,
configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)`` when the signature has a
``plans_manager`` parameter (they inspect it) and fall back to the deprecated 2.4-2.7 form
``(architecture_class_name, arch_init_kwargs, arch_init_kwargs_req_import, num_input_channels, num_output_channels,
enable_deep_supervision)`` otherwise. We implement the new form (the official v2.2 trainers use an older one still,
with ``dataset_json`` and without ``num_output_channels``). It is a ``classmethod`` rather than nnU-Net's
``staticmethod`` so that one implementation serves every variant; nnU-Net calls it on the class and on instances
alike, and ``inspect.signature`` of the bound method has the same parameters.

Network from the plans: STU-Net always has 6 stages / 5 downsamplings. Its pool kernels are the plan's
``pool_op_kernel_sizes`` without the leading ``[1, 1, 1]``, truncated to 5 or padded with ``[1, 1, 1]``
(:func:`medseg.models.stunet.pools_from_nnunet_plan`); all convolution kernels are 3x3x3 whatever the plan says, as in
the official trainers. Because the network may have more decoder outputs than the plan has stages, the
deep-supervision target scales are computed from STU-Net's own pools (5 outputs), not from the plan's.

How ``nnUNetv2_train ... -tr STUNetTrainer_small`` finds these classes without copying files into site-packages:
nnU-Net 2.8 searches, after its own package, every folder listed in the ``nnUNet_extTrainer`` environment variable
(``os.pathsep``-separated; see ``nnunetv2/utilities/find_objects.py``). medseg ships such a folder,
``medseg/integrations/nnunet/nnunet_trainers/``, holding one module that re-exports these classes; point the
variable at it (``medseg nnunet trainer-path`` prints it)::

    export nnUNet_extTrainer="$(medseg nnunet trainer-path)"
    nnUNetv2_train 501 3d_fullres 0 -tr STUNetTrainer_small -device cpu
    nnUNetv2_predict -i imgs -o out -d 501 -c 3d_fullres -f 0 -tr STUNetTrainer_small

Where torchvision does not import next to the installed torch (a CUDA torchvision wheel with the CPU torch), nnU-Net's
own commands fail on any ``-tr`` other than ``nnUNetTrainer`` before reaching that folder; ``medseg nnunet
train-native ...`` / ``predict-native ...`` (:mod:`medseg.integrations.nnunet.native`) run the same commands with the
shim applied and the folder added. medseg's runner and results predictor resolve the classes directly
(:func:`find_trainer_class`) and need neither.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from medseg.integrations.nnunet.shim import ensure_nnunet_importable

ensure_nnunet_importable()

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import (  # noqa: E402
    ConfigurationManager,
    PlansManager,
)

from medseg.core.errors import ConfigError  # noqa: E402
from medseg.models.stunet import (  # noqa: E402
    DEFAULT_CONV_KERNEL_SIZES,
    STUNET_VARIANTS,
    STUNet,
    pools_from_nnunet_plan,
)

__all__ = [
    "MEDSEG_TRAINERS",
    "STUNetTrainer",
    "STUNetTrainer_base",
    "STUNetTrainer_base_ft",
    "STUNetTrainer_huge",
    "STUNetTrainer_huge_ft",
    "STUNetTrainer_large",
    "STUNetTrainer_large_ft",
    "STUNetTrainer_small",
    "STUNetTrainer_small_ft",
    "STUNetTrainer_tiny",
    "build_stunet_from_plans",
    "find_trainer_class",
]

_TINY_VARIANT = {"dims": (4, 8, 16, 32, 64, 64), "depth": (1,) * 6}


def build_stunet_from_plans(
    configuration_manager: ConfigurationManager,
    num_input_channels: int,
    num_output_channels: int,
    *,
    dims: tuple[int, ...],
    depth: tuple[int, ...],
    enable_deep_supervision: bool = True,
) -> STUNet:
    """An :class:`STUNet` for an nnU-Net configuration (pools from the plan, 3x3x3 kernels, nnU-Net outputs).

    Args:
        configuration_manager: the plan's configuration (its ``pool_op_kernel_sizes`` and ``patch_size`` are read).
        num_input_channels: input channels ``C_in``.
        num_output_channels: segmentation heads ``C_out`` (nnU-Net's ``label_manager.num_segmentation_heads``).
        dims: the 6 stage widths.
        depth: the 6 per-stage block counts.
        enable_deep_supervision: return the 5 head outputs as a list (nnU-Net's convention: native resolutions,
            full resolution first) in training and validation.

    Raises:
        ConfigError: the configuration is not 3D (STU-Net is a 3D network).
    """
    if len(configuration_manager.patch_size) != 3:
        raise ConfigError(
            f"STU-Net cannot train the {len(configuration_manager.patch_size)}D configuration "
            f"(patch {list(configuration_manager.patch_size)})",
            expected="a 3D configuration such as 3d_fullres",
            hint="train STU-Net with 3d_fullres (or 3d_lowres)",
        )
    return STUNet(
        num_input_channels,
        num_output_channels,
        dims=dims,
        depth=depth,
        pool_op_kernel_sizes=pools_from_nnunet_plan(configuration_manager.pool_op_kernel_sizes),
        conv_kernel_sizes=DEFAULT_CONV_KERNEL_SIZES,
        deep_supervision=enable_deep_supervision,
        nnunet_outputs=True,
    )


class STUNetTrainer(nnUNetTrainer):
    """nnU-Net trainer for STU-Net-B (the official default ``STUNetTrainer``); subclasses pick the variant and lr."""

    stunet_variant: ClassVar[dict[str, tuple[int, ...]]] = STUNET_VARIANTS["stunet_b"]
    stunet_initial_lr: ClassVar[float] = 1e-2

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's own default
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.stunet_initial_lr

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """Build the variant's :class:`STUNet` from the plan (nnunetv2 2.8 signature; ``plans_manager`` unused)."""
        return build_stunet_from_plans(
            configuration_manager,
            num_input_channels,
            num_output_channels,
            dims=tuple(cls.stunet_variant["dims"]),
            depth=tuple(cls.stunet_variant["depth"]),
            enable_deep_supervision=enable_deep_supervision,
        )

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        # One scale per STU-Net output (5), from its own pools: the plan may have fewer stages than STU-Net.
        if not self.enable_deep_supervision:
            return None
        pools = [[1, 1, 1], *pools_from_nnunet_plan(self.configuration_manager.pool_op_kernel_sizes)]
        return [list(s) for s in 1 / np.cumprod(np.vstack(pools), axis=0)][:-1]


class STUNetTrainer_small(STUNetTrainer):
    """STU-Net-S (widths 16..256, 1 block per stage; 14.6 M parameters at 1 in / 105 out), lr 1e-2."""

    stunet_variant = STUNET_VARIANTS["stunet_s"]


class STUNetTrainer_base(STUNetTrainer):
    """STU-Net-B (widths 32..512, 1 block per stage; 58.26 M), lr 1e-2."""

    stunet_variant = STUNET_VARIANTS["stunet_b"]


class STUNetTrainer_large(STUNetTrainer):
    """STU-Net-L (widths 64..1024, 2 blocks per stage; 440.30 M), lr 1e-2."""

    stunet_variant = STUNET_VARIANTS["stunet_l"]


class STUNetTrainer_huge(STUNetTrainer):
    """STU-Net-H (widths 96..1536, 3 blocks per stage; 1457.33 M), lr 1e-2."""

    stunet_variant = STUNET_VARIANTS["stunet_h"]


class STUNetTrainer_small_ft(STUNetTrainer_small):
    """STU-Net-S fine-tuning: initial lr 1e-3."""

    stunet_initial_lr = 1e-3


class STUNetTrainer_base_ft(STUNetTrainer_base):
    """STU-Net-B fine-tuning: initial lr 1e-3."""

    stunet_initial_lr = 1e-3


class STUNetTrainer_large_ft(STUNetTrainer_large):
    """STU-Net-L fine-tuning: initial lr 1e-3."""

    stunet_initial_lr = 1e-3


class STUNetTrainer_huge_ft(STUNetTrainer_huge):
    """STU-Net-H fine-tuning: initial lr 1e-3."""

    stunet_initial_lr = 1e-3


class STUNetTrainer_tiny(STUNetTrainer):
    """STU-Net with widths 4..64 for smoke tests and CI (not a paper configuration), lr 1e-2."""

    stunet_variant = _TINY_VARIANT


#: Every trainer class medseg defines, by name.
MEDSEG_TRAINERS: dict[str, type[nnUNetTrainer]] = {
    cls.__name__: cls
    for cls in (
        STUNetTrainer,
        STUNetTrainer_small,
        STUNetTrainer_base,
        STUNetTrainer_large,
        STUNetTrainer_huge,
        STUNetTrainer_small_ft,
        STUNetTrainer_base_ft,
        STUNetTrainer_large_ft,
        STUNetTrainer_huge_ft,
        STUNetTrainer_tiny,
    )
}


def find_trainer_class(name: str) -> type[nnUNetTrainer]:
    """The trainer class called ``name``: medseg's STU-Net trainers first, then nnU-Net's own lookup.

    nnU-Net's lookup covers its package and the folders in ``nnUNet_extTrainer``.

    Raises:
        ConfigError: no trainer of that name exists (with the closest medseg names as a hint).
    """
    if name in MEDSEG_TRAINERS:
        return MEDSEG_TRAINERS[name]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError) as err:
        import difflib

        close = difflib.get_close_matches(name, [*MEDSEG_TRAINERS, "nnUNetTrainer"], n=3)
        raise ConfigError(
            f"nnU-Net trainer {name!r} not found",
            expected="an nnU-Net trainer class name (nnUNetTrainer, STUNetTrainer_small, ...)",
            hint=f"did you mean {', '.join(close)}?" if close else "list the folder defining it in nnUNet_extTrainer",
        ) from err
