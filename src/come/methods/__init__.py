"""Registry of depth-compression methods: one `MethodSpec` per method (methods/catalog.py).

A method is a callable `run(ctx, target_layers) -> None` that edits
`ctx.model` through the context's `merge_window` / `remove_layers` helpers
until it has `target_layers` decoder layers, recording what it did in
`ctx.steps`. Its spec says what it is (name, description), whether it runs
layer-wise, what it needs otherwise, the option values it uses instead of the
global defaults, and its own options; the spec is light (no torch), so the CLI
builds its flags from it, and the module with `run` is imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..errors import ComeError

if TYPE_CHECKING:
    from ..options import Option


class MethodFn(Protocol):
    def __call__(self, ctx, target_layers: int) -> None: ...


# What `come compress` uses unless told otherwise; how it compares with the other methods is in
# bench/results/README.md.
DEFAULT_METHOD = "come-search"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    entry: str  # "module:function" in this package, e.g. "laco:run"
    # Methods that run in layer-wise mode only touch layers through ctx.layers / ctx.cache a few at a time;
    # for the others, what they would need in memory.
    layerwise: bool = False
    needs: str = "the whole model in memory"
    # Option values the method uses unless the user gives them (e.g. come-search refits by default).
    defaults: Mapping = field(default_factory=dict)
    options: tuple[Option, ...] = ()  # the method's own options (the shared ones: options.SHARED)

    def load(self) -> MethodFn:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)


_REGISTRY: dict[str, MethodSpec] = {}


def _checked(spec: MethodSpec) -> MethodSpec:
    from ..options import SHARED_NAMES

    own = {o.name for o in spec.options}
    unknown = set(spec.defaults) - SHARED_NAMES - own
    if unknown:
        raise AssertionError(f"{spec.name}: defaults for options it does not have: {sorted(unknown)}")
    for o in spec.options:
        o.check(o.default)
    return spec


def specs() -> list[MethodSpec]:
    """Every method's spec, in the catalogue's order."""
    if not _REGISTRY:
        from .catalog import BUILTIN

        _REGISTRY.update((spec.name, _checked(spec)) for spec in BUILTIN)
    return list(_REGISTRY.values())


def get_spec(name: str) -> MethodSpec:
    specs()
    if name not in _REGISTRY:
        raise ComeError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_method(name: str) -> MethodFn:
    return get_spec(name).load()


def method_defaults(name: str) -> dict:
    return dict(get_spec(name).defaults)


def layerwise_methods() -> list[str]:
    return sorted(spec.name for spec in specs() if spec.layerwise)


def check_layerwise(name: str) -> None:
    """Refuse, before any work, a method that cannot run one layer at a time."""
    spec = get_spec(name)
    if not spec.layerwise:
        raise ComeError(
            f"method {name!r} cannot run with --layerwise: it needs {spec.needs}; "
            f"layer-wise methods: {', '.join(layerwise_methods())}"
        )


def available_methods() -> dict[str, str]:
    return {spec.name: spec.description for spec in sorted(specs(), key=lambda s: s.name)}
