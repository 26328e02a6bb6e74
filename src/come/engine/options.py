"""Compression options: each defined once (type, default, bounds, help), for the Python API, the CLI,
recipes and `come bench --set`.

The options every method reads (calibration, merge rules, refit, execution) are `SHARED` (defined with
`Option` in core/option_defs.py, which the methods' specs import); the options of one method are part of its
spec (`methods/catalog.py`), with the defaults it uses instead of the global ones. `CompressionOptions`, the record a method runs with (`ctx.options`) and that plans
keep, has one field per option of either kind and checks every value when it is made, so bounds and
choices are checked in one place. The CLI flags (cli/__init__.py), recipe validation (cli/recipe.py) and the keys
of `come bench --set` are generated from the same definitions. None means "not given" everywhere.
This module imports nothing heavy, so `come --help` stays fast.
"""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass

from ..core.option_defs import SHARED, SHARED_NAMES, Option


def all_options() -> dict[str, Option]:
    """Every option by name: the shared ones, then each method's own."""
    from ..methods import specs

    out = {o.name: o for o in SHARED}
    for spec in specs():
        for o in spec.options:
            if o.name in out:
                raise AssertionError(f"option {o.name!r} of {spec.name} is defined twice")
            out[o.name] = o
    return out


def options_of(cls) -> list[Option]:
    """The fields of a dataclass whose metadata holds help and bounds (e.g. DistillOptions) as Options."""
    from typing import get_type_hints

    hints = get_type_hints(cls)
    return [Option(f.name, hints[f.name], f.default, f.metadata.get("help", ""), min=f.metadata.get("min"),
                   max=f.metadata.get("max"), cli=f.metadata.get("cli", True)) for f in fields(cls)]


def schema(options, name: str, **extra):
    """A strict pydantic model of option definitions: unknown keys, wrong types and values out of an option's
    bounds or choices are refused (recipes, `come bench` definitions and --set)."""
    from typing import Annotated

    from pydantic import ConfigDict, Field, create_model

    fields_ = {}
    for o in options:
        annotation = o.type
        bounds = {k: v for k, v in (("ge", o.min), ("le", o.max)) if v is not None}
        if bounds and o.element is not None:
            annotation = tuple[Annotated[o.element, Field(**bounds)], ...]
        elif bounds:
            annotation = Annotated[annotation, Field(**bounds)]
        fields_[o.name] = (annotation, o.default)
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields_, **extra)


def validated(given: dict, where: str = "") -> dict:
    """`given` compression options checked against their definitions (names, types, bounds, choices), with
    the values as their types make them (e.g. a list for a tuple option: a tuple); raises InvalidTarget."""
    from pydantic import ValidationError

    from ..errors import InvalidTarget

    try:
        checked = schema(all_options().values(), "CompressionOptions").model_validate(given)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in (where, *e['loc']) if p != '')}: {e['msg']}" for e in exc.errors()]
        raise InvalidTarget("; ".join(parts)) from None
    return {k: getattr(checked, k) for k in given}


def owner(name: str) -> str | None:
    """The method an option belongs to, or None for a shared one."""
    from ..methods import specs

    return next((spec.name for spec in specs() for o in spec.options if o.name == name), None)


def choice_enum(option: Option):
    """A str Enum of a Literal option's values, for CLIs that list choices (typer)."""
    from enum import Enum

    return Enum("".join(part.title() for part in option.name.split("_")), {v: v for v in option.choices}, type=str)


def _check_all(self) -> None:
    defined = all_options()
    for f in fields(self):
        defined[f.name].check(getattr(self, f.name))


_CLASS = None


def _options_class():
    """CompressionOptions: a dataclass with a field per option (shared first, then by method), built once."""
    global _CLASS
    if _CLASS is None:
        _CLASS = make_dataclass(
            "CompressionOptions",
            [(o.name, o.type, field(default=o.default)) for o in all_options().values()],
            namespace={"__post_init__": _check_all, "__module__": __name__,
                       "__doc__": "Every compression option's value, as a method runs with it (see options.py)."},
        )
    return _CLASS


def __getattr__(name: str):
    if name == "CompressionOptions":
        return _options_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_options(method_defaults: dict, options: dict):
    """Options given (None means "not given") over the method's defaults over the global ones; every value is
    checked against its option's definition."""
    from ..errors import InvalidTarget

    known = all_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InvalidTarget(f"unknown compression option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    return _options_class()(**{**method_defaults, **given})


def resolved_for(method: str, options: dict) -> dict:
    """What `method` runs with given `options`: every option it reads (the shared ones and its own), resolved
    and checked, as a dict of JSON values; e.g. what a `come bench` cell is keyed by. Other methods' options
    are left out: they have no effect on this method."""
    import dataclasses
    import json

    from ..methods import get_spec

    spec = get_spec(method)
    resolved = dataclasses.asdict(resolve_options(spec.defaults_for(options), options))
    mine = SHARED_NAMES | {o.name for o in spec.options}
    return json.loads(json.dumps({k: v for k, v in resolved.items() if k in mine}))
