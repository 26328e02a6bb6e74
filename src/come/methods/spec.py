"""MethodSpec: what a method is (name, description, entry point, layer-wise or not, defaults, options).

Apart from the registry (methods/__init__.py) so that the catalogue can import it: no import circle.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..core.option_defs import Option


class MethodFn(Protocol):
    def __call__(self, ctx, target_layers: int) -> None: ...


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
    # "module:function" that gives further defaults from the options given (e.g. replay takes its plan's), or None.
    defaults_from: str | None = None

    def defaults_for(self, options: Mapping) -> dict:
        """The option values this method uses unless given: its defaults, then what `defaults_from` derives."""
        if self.defaults_from is None:
            return dict(self.defaults)
        return {**self.defaults, **_function(self.defaults_from)(options)}

    def load(self) -> MethodFn:
        return _function(self.entry)


def _function(where: str):
    """The function named "module:function" in this package."""
    module, _, function = where.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)
