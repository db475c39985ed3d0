"""Error hierarchy for medseg.

Every error that reaches a user (CLI, server, Python caller) is a :class:`MedsegError` whose message says
what was wrong, what was expected and how to fix it, on one line.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class of every user-facing medseg error.

    Args:
        what: what was wrong, naming the file or value concerned.
        expected: what medseg expected instead.
        hint: how to fix it.
        path: the file or folder the error is about, if any (kept for callers such as the server).

    Examples::

        >>> raise DataError("case001.nii.gz has 2 channels", expected="1 channel (MRI)", hint="check dataset.json")
    """

    def __init__(
        self, what: str, *, expected: str | None = None, hint: str | None = None, path: str | Path | None = None
    ) -> None:
        self.what = what
        self.expected = expected
        self.hint = hint
        self.path = None if path is None else str(path)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one-line message: ``what; expected ...; hint: ...``."""
        parts = [self.what]
        if self.expected:
            parts.append(f"expected {self.expected}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, str | None]:
        """JSON-friendly form ``{error, detail, hint}`` used by the server."""
        detail = self.what if not self.expected else f"{self.what}; expected {self.expected}"
        return {"error": type(self).__name__, "detail": detail, "hint": self.hint}


class ConfigError(MedsegError):
    """A configuration file, CLI option or keyword argument is invalid."""


class DataError(MedsegError):
    """An image, label, DICOM series or dataset folder is unreadable or inconsistent."""


class ModelInputError(MedsegError):
    """A tensor or request does not fit a model's input contract (channels, shape, divisibility)."""


class WeightsError(MedsegError):
    """A checkpoint is missing, corrupt or does not match the model's state-dict layout."""
