"""Registry of depth-compression methods.

A method is a callable `run(ctx, target_layers) -> None` that edits
`ctx.model` through the context's `merge_window` / `remove_layers` helpers
until it has `target_layers` decoder layers, recording what it did in
`ctx.steps`. Registering one is a decorator in its own module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Protocol

from ..errors import ComeError


class MethodFn(Protocol):
    def __call__(self, ctx, target_layers: int) -> None: ...


# What `come compress` uses unless told otherwise; how it compares with the other methods is in
# bench/results/README.md.
DEFAULT_METHOD = "come-search"

METHODS: dict[str, MethodFn] = {}
DESCRIPTIONS: dict[str, str] = {}
# Methods that run in layer-wise mode (they only touch layers through ctx.layers / ctx.cache a
# few at a time), and for the others what they would need in memory.
LAYERWISE: set[str] = set()
NEEDS: dict[str, str] = {}
# Option values a method uses unless the user gives them (e.g. come-search refits by default).
DEFAULTS: dict[str, dict] = {}


def register(
    name: str,
    description: str,
    layerwise: bool = False,
    needs: str = "the whole model in memory",
    defaults: dict | None = None,
) -> Callable[[MethodFn], MethodFn]:
    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        DESCRIPTIONS[name] = description
        if layerwise:
            LAYERWISE.add(name)
        NEEDS[name] = needs
        DEFAULTS[name] = dict(defaults or {})
        return fn

    return wrap


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> MethodFn:
    _load_all()
    if name not in METHODS:
        raise ComeError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_defaults(name: str) -> dict:
    get_method(name)
    return dict(DEFAULTS[name])


def check_layerwise(name: str) -> None:
    """Refuse, before any work, a method that cannot run one layer at a time."""
    get_method(name)
    if name not in LAYERWISE:
        raise ComeError(
            f"method {name!r} cannot run with --layerwise: it needs {NEEDS[name]}; "
            f"layer-wise methods: {', '.join(sorted(LAYERWISE))}"
        )


def available_methods() -> dict[str, str]:
    _load_all()
    return dict(sorted(DESCRIPTIONS.items()))
