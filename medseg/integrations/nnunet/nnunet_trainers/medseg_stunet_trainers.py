"""Re-export of medseg's STU-Net trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (see the package docstring)."""

from medseg.integrations.nnunet.trainers import *  # noqa: F401,F403
