"""A folder for nnU-Net's ``nnUNet_extTrainer`` lookup, exposing medseg's STU-Net trainers to ``nnUNetv2_train``.

nnU-Net 2.8 imports every module of each folder named in ``nnUNet_extTrainer`` as a top-level module and takes the
first class with the requested name. This folder therefore holds a single module, ``medseg_stunet_trainers``, that
re-exports :mod:`medseg.integrations.nnunet.trainers`. Usage::

    export nnUNet_extTrainer="$(medseg nnunet trainer-path)"
    nnUNetv2_train 501 3d_fullres 0 -tr STUNetTrainer_small

(``medseg nnunet train-native`` does the same without the variable and with the torchvision shim applied.)
"""
