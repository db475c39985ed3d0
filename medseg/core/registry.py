"""A name → object registry that refuses duplicates and suggests names for typos."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from medseg.core.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return a hint naming the closest choices to ``name`` (empty string if none is close)."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    lookup = {c.lower(): c for c in choices}
    return f"did you mean {', '.join(repr(lookup[c]) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """Named registry of objects (builders, transforms, losses).

    Args:
        kind: what the registry holds, used in error messages ("model", "loss").

    Examples::

        >>> losses: Registry[Callable] = Registry("loss")
        >>> @losses.register("dice_ce")
        ... def make_dice_ce(): ...
        >>> losses.get("dice_ce")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an object under ``name``; a duplicate name raises ``ConfigError``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``."""
        if name in self._items:
            raise ConfigError(f"{self.kind} {name!r} is registered twice", hint="give each entry a unique name")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise ``ConfigError`` with a suggestion."""
        try:
            return self._items[name]
        except KeyError:
            hint = did_you_mean(name, list(self._items)) or f"run `medseg models` or use one of {sorted(self._items)}"
            raise ConfigError(
                f"unknown {self.kind} {name!r}", expected=f"one of {sorted(self._items)}", hint=hint
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def values(self) -> list[T]:
        """Registered objects in registration order."""
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
