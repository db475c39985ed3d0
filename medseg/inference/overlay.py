"""Overlay pictures of a mask on its image (axial, coronal, sagittal through the mask's centre)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

from medseg.core.atomic import atomic_write
from medseg.inference.sliding import plain
from medseg.transforms.presets import RAS_LABELS


def _ras(volume: MetaTensor) -> np.ndarray:
    return np.asarray(Orientation(axcodes="RAS", labels=RAS_LABELS)(volume))


def save_overlay(
    image: MetaTensor, mask: MetaTensor, path: Path, label_names: tuple[str, ...], title: str = ""
) -> Path:
    """Write a PNG with three orthogonal slices of ``image (C, X, Y, Z)`` and ``mask (X, Y, Z)`` in RAS display.

    Args:
        image: the input image (first channel shown).
        mask: labels on the image's grid.
        path: output PNG.
        label_names: legend names of label values.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img = _ras(MetaTensor(plain(image[:1]).float(), affine=image.affine))[0]
    lbl = _ras(MetaTensor(plain(torch.as_tensor(mask))[None].float(), affine=mask.affine))[0].astype(int)
    fg = np.argwhere(lbl > 0)
    centre = fg.mean(0).astype(int) if len(fg) else np.array(lbl.shape) // 2
    cmap = plt.get_cmap("tab10")
    views = {
        "axial": (img[:, :, centre[2]], lbl[:, :, centre[2]]),
        "coronal": (img[:, centre[1], :], lbl[:, centre[1], :]),
        "sagittal": (img[centre[0], :, :], lbl[centre[0], :, :]),
    }
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, (im, lb)) in zip(axes, views.items(), strict=True):
        ax.imshow(im.T, cmap="gray", origin="lower")
        rgba = np.zeros((*lb.T.shape, 4))
        for value in range(1, len(label_names)):
            rgba[lb.T == value] = (*cmap(value - 1)[:3], 0.45)
        ax.imshow(rgba, origin="lower")
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=cmap(v - 1), label=n) for v, n in enumerate(label_names) if v > 0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles))
    if title:
        fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path
