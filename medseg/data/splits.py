"""Deterministic train/validation splits and k-fold cross-validation over cases.

Cases are sorted by case id before a seeded shuffle, so a split depends only on the case ids and the seed, never on
the order files were listed on disk. :func:`kfold` follows nnU-Net's 5-fold scheme (sorted ids, seeded shuffle, folds
of near-equal size, each case in exactly one validation fold); it uses :mod:`random` rather than scikit-learn, so the
folds are not identical to nnU-Net's ``splits_final.json`` for the same data.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence

from medseg.core.errors import ConfigError, DataError
from medseg.data.manifest import Case

logger = logging.getLogger(__name__)


def split_cases(
    cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0, min_val: int = 1
) -> tuple[tuple[Case, ...], tuple[Case, ...]]:
    """Split cases into training and validation sets, deterministically.

    Args:
        cases: the cases to split (e.g. ``manifest.cases``); case ids must be unique.
        val_fraction: share of cases used for validation, in ``[0, 1)``; rounded to the nearest count.
        seed: seed of the shuffle.
        min_val: fewest validation cases. Both sides keep at least one case.

    Returns:
        ``(train, val)``, each sorted by case id.

    Raises:
        DataError: fewer than 2 cases, or duplicate case ids.
        ConfigError: ``val_fraction`` outside ``[0, 1)`` or ``min_val`` < 1.

    Examples::

        >>> train, val = split_cases(manifest.cases, val_fraction=0.2, seed=0)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be >= 0 and < 1, got {val_fraction}", hint="use e.g. 0.2")
    if min_val < 1:
        raise ConfigError(f"min_val must be >= 1, got {min_val}")
    ordered = _shuffled(cases, seed, needed=2, what="a train/validation split")
    n = len(ordered)
    n_val = min(max(min_val, round(n * val_fraction)), n - 1)
    val, train = ordered[:n_val], ordered[n_val:]
    logger.debug("split %d cases into %d train / %d val (seed %d)", n, len(train), len(val), seed)
    return _by_id(train), _by_id(val)


def kfold(cases: Sequence[Case], k: int = 5, seed: int = 0) -> list[tuple[tuple[Case, ...], tuple[Case, ...]]]:
    """Return ``k`` folds ``(train, val)``; every case is in exactly one validation set.

    The first ``len(cases) % k`` folds get one extra validation case, as in scikit-learn's ``KFold``.

    Args:
        cases: the cases to split; case ids must be unique.
        k: number of folds, >= 2.
        seed: seed of the shuffle.

    Returns:
        A list of ``k`` pairs ``(train, val)``, each sorted by case id.

    Raises:
        DataError: fewer cases than folds, or duplicate case ids.
        ConfigError: ``k`` < 2.
    """
    if k < 2:
        raise ConfigError(f"k must be >= 2, got {k}", hint="use k=5 as nnU-Net does")
    ordered = _shuffled(cases, seed, needed=k, what=f"{k}-fold cross-validation")
    sizes = [len(ordered) // k + (1 if i < len(ordered) % k else 0) for i in range(k)]
    folds, start = [], 0
    for size in sizes:
        val = ordered[start : start + size]
        train = ordered[:start] + ordered[start + size :]
        folds.append((_by_id(train), _by_id(val)))
        start += size
    return folds


def _shuffled(cases: Sequence[Case], seed: int, needed: int, what: str) -> list[Case]:
    if len(cases) < needed:
        raise DataError(
            f"{what} needs at least {needed} cases, got {len(cases)}",
            hint="add labelled cases, or use fewer folds" if needed > 2 else "add labelled cases to the dataset",
        )
    ordered = _by_id(cases)
    duplicates = sorted(i for i, n in Counter(c.case_id for c in ordered).items() if n > 1)
    if duplicates:
        raise DataError(f"duplicate case ids {duplicates[:5]}", expected="unique case ids", hint="rename the cases")
    shuffled = list(ordered)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def _by_id(cases: Sequence[Case]) -> tuple[Case, ...]:
    return tuple(sorted(cases, key=lambda c: c.case_id))
