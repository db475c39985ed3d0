"""Label names of a dataset: declared by its metadata, or inferred from the label files."""

from __future__ import annotations

import logging

import numpy as np

from medseg.core.errors import DataError
from medseg.data.manifest import Manifest
from medseg.io import load_image

logger = logging.getLogger(__name__)


def resolve_label_names(manifest: Manifest) -> tuple[str, ...]:
    """Declared label names, or ``background, label_1 ... label_N`` with N the largest value found in the labels.

    Raises:
        DataError: no labelled case, or inferred labels that are not consecutive non-negative integers.
    """
    if manifest.label_names:
        return tuple(manifest.label_names)
    labelled = [c for c in manifest.cases if c.label is not None]
    if not labelled:
        raise DataError(f"dataset {manifest.root} has no labelled case", hint="add label files to train on it")
    top = 0
    for case in labelled:
        values = np.unique(np.asarray(load_image(case.label, allow_external_data=True)))
        if np.any(values < 0) or np.any(values != np.round(values)):
            raise DataError(f"label {case.label} holds non-integer or negative values", path=case.label)
        top = max(top, int(values.max()))
    names = ("background", *(f"label_{i}" for i in range(1, top + 1)))
    logger.info("dataset %s declares no label names; using %s", manifest.root, names)
    return names
