"""Name → implementation registries (models, matchers, normalizations, pruners) that configs can name.

A registered method's options are its keyword-only parameters: their type hints and defaults are the option
schema (as mergekit derives its from method signatures), so a misspelt option fails before any work.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, Literal, TypeVar, Union

T = TypeVar("T")

REQUIRED = inspect.Parameter.empty  # the "default" of an option that has none


def _conforms(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` for the simple cases (Literal, None, bool/int/float/str, unions)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return any(_conforms(value, a) for a in typing.get_args(annotation))
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # anything richer (tensors, statistics objects) is the method's to check


def _show(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


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
        """The registered names, sorted."""
        return sorted(self)

    def get_or_fail(self, name: str) -> T:
        """The implementation registered as ``name``; an unknown name fails listing the valid ones."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self[name]

    def options(self, name: str) -> dict[str, tuple[Any, Any]]:
        """``{option: (type hint, default)}`` of ``name``'s keyword-only parameters (default ``REQUIRED`` if none)."""
        fn = self.get_or_fail(name)
        if not callable(fn):
            return {}
        params = inspect.signature(fn).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            raise TypeError(f"{self.kind} {name!r} takes **kwargs; declare its options as keyword-only parameters")
        hints = typing.get_type_hints(fn)
        keyword_only = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        return {p.name: (hints.get(p.name, Any), p.default) for p in keyword_only}

    def check_options(self, name: str, opts: Mapping[str, Any], owner: str) -> None:
        """Fail in one line naming the option of ``opts`` that ``name`` does not accept, mistypes or misses."""
        accepted = self.options(name)
        listed = ", ".join(accepted) or "none"
        for key, value in opts.items():
            if key not in accepted:
                raise ValueError(f"{owner}: {self.kind} {name!r} has no option {key!r}; its options are: {listed}")
            hint = accepted[key][0]
            if not _conforms(value, hint):
                raise ValueError(
                    f"{owner}: {self.kind} {name!r} option {key!r} must be {_show(hint)}, got {value!r}"
                )
        missing = [k for k, (_, default) in accepted.items() if default is REQUIRED and k not in opts]
        if missing:
            raise ValueError(f"{owner}: {self.kind} {name!r} needs option(s) {', '.join(missing)}")
