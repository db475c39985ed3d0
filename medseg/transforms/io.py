"""Loading transforms that read through :mod:`medseg.io`, so training, inference and the server share one reader.

Array form :class:`LoadImage` and dictionary form :class:`LoadImaged`, as in MONAI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from medseg.io import load_channels, load_image


class LoadImage(Transform):
    """Load an image (or a list of per-channel files) as a channel-first ``MetaTensor (C, X, Y, Z)``.

    MONAI's ``LoadImage`` picks a reader per file from several candidates; medseg keeps one reader per format
    (see :func:`medseg.io.load_image`), so this transform delegates to it.

    Args:
        allow_external_data: read detached headers (``.nhdr``, ``.mhd``, NIfTI ``.hdr``/``.img``) whose data file
            lies in the header's own folder. Dataset loaders opt in (a dataset is a local folder the user chose);
            anything reading uploads must not (see ``docs/security.md``).
    """

    def __init__(self, allow_external_data: bool = False) -> None:
        self.options = {"allow_external_data": bool(allow_external_data)}

    def __call__(self, path: str | Path | Sequence[str | Path] | MetaTensor) -> MetaTensor:
        if isinstance(path, MetaTensor):
            return path
        if isinstance(path, (list, tuple)):
            if len(path) > 1:
                return load_channels([Path(p) for p in path], **self.options)
            return load_image(path[0], **self.options)
        return load_image(path, **self.options)


class LoadImaged(MapTransform):
    """Dictionary form of :class:`LoadImage`; missing keys are allowed when ``allow_missing_keys``."""

    def __init__(
        self, keys: KeysCollection, allow_missing_keys: bool = False, allow_external_data: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(allow_external_data=allow_external_data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
