"""Registry of depth-compression methods: one `MethodSpec` (methods/spec.py) per method (methods/catalog.py).

A method is a callable `run(ctx, target_layers) -> None` that edits
`ctx.model` through the context's `merge_window` / `remove_layers` helpers
until it has `target_layers` decoder layers, recording what it did in
`ctx.steps`. Its spec says what it is (name, description), whether it runs
layer-wise, what it needs otherwise, the option values it uses instead of the
global defaults, and its own options; the spec is light (no torch), so the CLI
builds its flags from it, and the module with `run` is imported on first use.
"""

from __future__ import annotations

from ..errors import ComeError
from .spec import MethodFn, MethodSpec

# What `come compress` uses unless told otherwise; how it compares with the other methods is in
# bench/results/README.md.
DEFAULT_METHOD = "come-search"


_REGISTRY: dict[str, MethodSpec] = {}


def _checked(spec: MethodSpec) -> MethodSpec:
    from ..core.option_defs import SHARED_NAMES

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
