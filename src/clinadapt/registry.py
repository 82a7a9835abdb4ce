"""One registry mechanism for datasets, backbones and methods."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from clinadapt.errors import UnknownNameError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """A hint sentence naming the closest valid choices, or an empty string."""
    close = difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """Lower-case unique names mapped to objects, with wildcard listing and helpful errors."""

    def __init__(self, kind: str, listing: str | None = None) -> None:
        self.kind = kind
        self.listing = listing or f"clinadapt {kind}s"
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj`` this is a decorator."""
        if name != name.lower() or not name:
            raise ValueError(f"{self.kind} names must be non-empty and lower-case, got {name!r}")

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}.{did_you_mean(key, list(self._items))} "
                f"Run `{self.listing}` to list them."
            )
        return self._items[key]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern.lower()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
