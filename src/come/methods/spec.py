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

    def load(self) -> MethodFn:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)
