"""Deterministic, disjoint train/validation splits and k-fold cross-validation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from medseg.core.errors import ConfigError, DataError
from medseg.data import Case, kfold, split_cases


def make_cases(n: int) -> list[Case]:
    return [
        Case(f"case_{i:03d}", (Path(f"images/case_{i:03d}.nii.gz"),), Path(f"labels/case_{i:03d}.nii.gz"))
        for i in range(n)
    ]


def ids(cases: tuple[Case, ...]) -> list[str]:
    return [c.case_id for c in cases]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    cases = make_cases(20)
    train, val = split_cases(cases, val_fraction=0.2, seed=0)
    assert (len(train), len(val)) == (16, 4)
    assert not set(ids(train)) & set(ids(val))
    assert sorted(ids(train) + ids(val)) == ids(tuple(cases))
    assert ids(train) == sorted(ids(train)) and ids(val) == sorted(ids(val))

    shuffled = list(cases)
    random.Random(7).shuffle(shuffled)
    assert split_cases(shuffled, val_fraction=0.2, seed=0) == (train, val)  # input order does not matter
    assert split_cases(cases, val_fraction=0.2, seed=1) != (train, val)


@pytest.mark.parametrize(
    ("n", "fraction", "min_val", "n_val"), [(2, 0.2, 1, 1), (3, 0.0, 1, 1), (5, 0.9, 1, 4), (10, 0.1, 3, 3)]
)
def test_split_keeps_both_sides_non_empty(n: int, fraction: float, min_val: int, n_val: int) -> None:
    train, val = split_cases(make_cases(n), val_fraction=fraction, min_val=min_val)
    assert len(val) == n_val and len(train) == n - n_val


@pytest.mark.parametrize("n", [0, 1])
def test_split_needs_two_cases(n: int) -> None:
    with pytest.raises(DataError, match="at least 2 cases") as info:
        split_cases(make_cases(n))
    assert info.value.hint


def test_split_rejects_bad_arguments_and_duplicates() -> None:
    with pytest.raises(ConfigError, match="val_fraction must be >= 0 and < 1, got 1.5"):
        split_cases(make_cases(4), val_fraction=1.5)
    with pytest.raises(DataError, match="duplicate case ids"):
        split_cases(make_cases(3) + make_cases(1))


def test_kfold_like_nnunet() -> None:
    cases = make_cases(12)
    folds = kfold(cases, k=5, seed=0)
    assert len(folds) == 5
    assert [len(val) for _, val in folds] == [3, 3, 2, 2, 2]
    all_val = [cid for _, val in folds for cid in ids(val)]
    assert sorted(all_val) == ids(tuple(cases))  # every case validated exactly once
    for train, val in folds:
        assert not set(ids(train)) & set(ids(val)) and len(train) + len(val) == 12
    assert kfold(list(reversed(cases)), k=5, seed=0) == folds
    assert kfold(cases, k=5, seed=3) != folds


def test_kfold_errors() -> None:
    with pytest.raises(DataError, match="5-fold cross-validation needs at least 5 cases, got 3"):
        kfold(make_cases(3))
    with pytest.raises(ConfigError, match="k must be >= 2"):
        kfold(make_cases(3), k=1)
