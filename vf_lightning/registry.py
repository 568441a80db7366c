"""Name → implementation registries (models, matchers, normalizations, pruners) that configs can name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A dict of named implementations; ``register`` refuses duplicates, ``get_or_fail`` lists valid names."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an implementation under ``name``."""

        def deco(fn: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self)

    def get_or_fail(self, name: str) -> T:
        """The implementation registered as ``name``; an unknown name fails listing the valid ones."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self[name]
