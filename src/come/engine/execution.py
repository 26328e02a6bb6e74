"""Where the model's weights are while a method works on it: one interface, two ways of running.

An `Execution` loads the model (`load`), gives the method its decoder layers (`layers`: the
`scoring.ModelLayers` interface that the context and the boundary cache go through) and writes the
result (`save`). `InMemory` holds the whole model; `Layerwise` builds it on the meta device, reads
its layers from the checkpoint one at a time and streams the output into shards, so a model larger
than memory can be compressed. `compress()` runs the same steps whichever it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.adapters import Adapter
from ..core.scoring import ModelLayers
from ..errors import InvalidTarget
from .models import LoadedModel, load_model, parse_dtype, resolve_device

if TYPE_CHECKING:
    from .options import CompressionOptions


class Execution:
    """The in-memory model and the layer-wise one, seen by `compress()`."""

    layerwise = False

    def __init__(self, model: str | LoadedModel | None, dtype: str = "float32", device: str = "cpu"):
        self.source, self.dtype, self.device = model, dtype, device

    def check_save(self) -> None:
        """Refuse unusable save settings before any work."""

    def load(self) -> LoadedModel:
        raise NotImplementedError

    def layers(self, model: nn.Module, adapter: Adapter, work: Path | None) -> ModelLayers:
        """The decoder layers of the loaded `model`; `work`: the run's private folder, if it has one."""
        raise NotImplementedError

    def settings(self) -> dict:
        """This mode's entries in the plan's `execution` record (after the activation storage)."""
        return {}

    def counters(self) -> dict:
        """What this mode counted during the run, for the plan's `execution` record."""
        return {}

    def save(self, layers: ModelLayers, tokenizer, plan: dict, out: Path, *, overwrite: bool = False,
             sources: list | None = None, save_dtype: torch.dtype | None = None) -> Path:
        """Write the compressed model as a checkpoint folder at `out`, atomically; floating weights in `save_dtype`."""
        raise NotImplementedError


class InMemory(Execution):
    """The whole model in memory: loaded by `models.load_model` (or given loaded), saved by save_pretrained."""

    def load(self) -> LoadedModel:
        if isinstance(self.source, LoadedModel):
            return self.source
        return load_model(self.source, dtype=self.dtype, device=self.device)

    def layers(self, model: nn.Module, adapter: Adapter, work: Path | None) -> ModelLayers:
        return ModelLayers(model, adapter)

    def save(self, layers, tokenizer, plan, out, *, overwrite=False, sources=None, save_dtype=None) -> Path:
        from ..artifacts.publish import save_compressed

        return save_compressed(layers.model, tokenizer, plan, out, overwrite=overwrite, sources=sources,
                               save_dtype=save_dtype)


class Layerwise(Execution):
    """A local safetensors folder (or the default model) never held whole: see `layerwise`.

    Merged layers go to the work folder unless `merged_on_disk` is False (memory is expected to be
    short); the output is streamed into shards of at most `max_shard_size`.
    """

    layerwise = True

    def __init__(self, model: str | None, dtype: str = "float32", device: str = "cpu", *, method: str,
                 max_shard_size: str | int = "2GB", merged_on_disk: bool = True):
        from ..methods import check_layerwise

        check_layerwise(method)
        if isinstance(model, LoadedModel):
            raise InvalidTarget("--layerwise reads the model from its folder; pass the folder, not a loaded model")
        super().__init__(model, dtype, device)
        self.max_shard_size, self.merged_on_disk = max_shard_size, merged_on_disk
        self.checkpoint = None
        self.lazy = None

    def check_save(self) -> None:
        from .checkpoint import parse_size

        parse_size(self.max_shard_size)  # a typo here should not cost a whole run

    def load(self) -> LoadedModel:
        from .layerwise import load_layerwise

        loaded, self.checkpoint = load_layerwise(self.source, dtype=self.dtype, device=self.device)
        return loaded

    def layers(self, model, adapter, work):
        from .lazy_layers import LazyLayers

        self.lazy = LazyLayers(model, adapter, self.checkpoint, resolve_device(self.device), parse_dtype(self.dtype),
                               merged_dir=work if self.merged_on_disk else None)
        return self.lazy

    def settings(self) -> dict:
        return {"merged_layers": "disk" if self.merged_on_disk else "ram"}

    def counters(self) -> dict:
        return {"layer_loads": self.lazy.loads, "peak_layers_loaded": self.lazy.peak_live}

    def save(self, layers, tokenizer, plan, out, *, overwrite=False, sources=None, save_dtype=None) -> Path:
        from ..artifacts.publish import publish
        from .layerwise import write_layerwise

        return publish(out, tokenizer, plan, lambda folder: write_layerwise(layers, folder, self.max_shard_size, save_dtype),
                       overwrite=overwrite, sources=sources)


def open_execution(model: str | LoadedModel | None, opts: CompressionOptions, *, method: str, layerwise: bool = False,
                   dtype: str = "float32", device: str = "cpu", max_shard_size: str | int = "2GB") -> Execution:
    """The execution for `compress()`'s arguments; refuses, before any work, what the mode cannot run."""
    if not layerwise:
        return InMemory(model, dtype, device)
    # Layer-wise runs expect memory to be short: merged layers go to disk unless RAM was asked for.
    return Layerwise(model, dtype, device, method=method, max_shard_size=max_shard_size,
                     merged_on_disk=opts.activation_storage != "ram")
