"""`LazyLayers`: the decoder layers of a meta-device model whose weights stay in a safetensors checkpoint.

A layer is read from the checkpoint (memory-mapped) when first used and freed once no longer held;
the embeddings exist only while the calibration inputs are captured, the final norm and LM head only
while a loss is computed. Merged layers are kept as state dicts, in RAM or as files in a work folder;
untouched layers stay in the original files until the export streams them (`model_tensors`).
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..core.adapters import Adapter
from ..errors import ComeError, ModelLoadError
from .checkpoint import TORCH_DTYPES, Checkpoint


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


class _Entry:
    """One current decoder layer: a meta `shell` (its structure) and where its weights are:
    `source` (an original layer in the checkpoint) or `saved` (a merged layer's state dict, or its file)."""

    def __init__(self, shell: nn.Module, source: int | None = None, saved: dict | Path | None = None):
        self.shell, self.source, self.saved = shell, source, saved


class LazyLayers:
    """The `scoring.ModelLayers` interface for a meta-device model whose weights stay in the checkpoint.

    `layers[k]` materialises layer k (a private copy of its shell with real
    weights) and keeps the last `keep` ones used; a layer is freed as soon as
    neither this cache nor a caller holds it. The meta model's layer list is
    kept in step with merges and removals, so its config and parameter counts
    stay right.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        checkpoint: Checkpoint,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        merged_dir: str | Path | None = None,
        keep: int = 2,
    ):
        self.model, self.adapter, self.checkpoint = model, adapter, checkpoint
        self.device, self.dtype = torch.device(device), dtype
        self.merged_dir = Path(merged_dir) if merged_dir is not None else None
        self.keep_loaded = keep
        self.entries = [_Entry(shell, source=i) for i, shell in enumerate(adapter.layers(model))]
        self._loaded: OrderedDict[_Entry, nn.Module] = OrderedDict()
        self._live: weakref.WeakSet = weakref.WeakSet()
        self.loads = 0  # decoder layers materialised (from the checkpoint or the merged-layer store)
        self.peak_live = 0  # most decoder layers materialised at the same time
        self._merges = 0
        check_checkpoint(model, adapter, checkpoint)
        # Tensors a decoder layer has (stray checkpoint entries such as old rotary buffers are skipped).
        self._layer_keys = set(self.entries[0].shell.state_dict()) if self.entries else set()

    # -- the ModelLayers interface --------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, k: int) -> nn.Module:
        entry = self.entries[k]
        layer = self._loaded.get(entry)
        if layer is None:
            while self._loaded and len(self._loaded) >= self.keep_loaded:  # make room first: peak = keep_loaded
                self._loaded.popitem(last=False)
            layer = self._materialise(entry.shell, self.layer_state(entry))
            self.loads += 1
            self._live.add(layer)
            self.peak_live = max(self.peak_live, len(self._live))
            self._loaded[entry] = layer
        else:
            self._loaded.move_to_end(entry)
        return layer

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def replace(self, start: int, size: int, new_layer: nn.Module) -> None:
        """Layers start..start+size-1 become `new_layer`, whose weights move to RAM or the work folder."""
        state = {k: v.detach().to("cpu") for k, v in new_layer.state_dict().items()}
        saved: dict | Path = state
        if self.merged_dir is not None:
            from safetensors.torch import save_file

            self._merges += 1
            saved = self.merged_dir / f"merged-{self._merges:04d}.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, saved)
        new_layer.to("meta")  # becomes the shell: the merged structure without weights
        self._set(self.entries[:start] + [_Entry(new_layer, saved=saved)] + self.entries[start + size :])

    def keep(self, indices: list[int]) -> None:
        self._set([self.entries[k] for k in indices])

    @contextmanager
    def capture(self):
        """Real embeddings and pass-through decoder layers, so the model's own forward yields
        the hidden state and kwargs every layer receives without running (or loading) any layer."""
        path = self.adapter.embed_path
        shell = self.model.get_submodule(path)
        layers = list(self.adapter.layers(self.model))
        self.model.set_submodule(path, self._load_module(path))
        for layer in layers:
            layer.forward = _pass_through
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward
            self.model.set_submodule(path, shell)

    @contextmanager
    def head(self):
        yield self._load_module(self.adapter.final_norm_path), self._load_module(self.adapter.lm_head_path)

    def release(self) -> None:
        self._loaded.clear()

    # -- weights ------------------------------------------------------------
    def layer_tensors(self, entry: _Entry) -> list[tuple]:
        """(name within the layer, dtype, shape, reader) of every tensor of `entry`, none loaded yet."""
        if entry.source is not None:
            return [(k, *self.checkpoint.spec(n, self.dtype), self._reader(n)) for k, n in self._source_names(entry.source)]
        if isinstance(entry.saved, dict):
            return [(k, v.dtype, tuple(v.shape), (lambda v=v: v)) for k, v in entry.saved.items()]
        from safetensors import safe_open

        with safe_open(entry.saved, framework="pt") as f:
            specs = [(k, TORCH_DTYPES[f.get_slice(k).get_dtype()], tuple(f.get_slice(k).get_shape())) for k in f.keys()]  # noqa: SIM118
        return [(k, dtype, shape, self._saved_reader(entry.saved, k)) for k, dtype, shape in specs]

    def model_tensors(self) -> list[tuple]:
        """(name, dtype, shape, reader) of every tensor of the current model: the non-layer tensors of the
        checkpoint (not a tied LM head, as save_pretrained), then every layer under its new index."""
        model, adapter, checkpoint = self.model, self.adapter, self.checkpoint
        prefix = adapter.layers_path + "."
        wanted = set(model.state_dict())
        if getattr(model.config, "tie_word_embeddings", False):
            wanted.discard(f"{adapter.lm_head_path}.weight")
        items = [
            (n, *checkpoint.spec(n, self.dtype), self._reader(n))
            for n in checkpoint.names
            if n in wanted and not n.startswith(prefix)
        ]
        for j, entry in enumerate(self.entries):
            items += [(f"{prefix}{j}.{rel}", dtype, shape, read) for rel, dtype, shape, read in self.layer_tensors(entry)]
        return items

    def layer_state(self, entry: _Entry) -> dict[str, torch.Tensor]:
        if entry.source is not None:
            names = dict(self._source_names(entry.source))
            tensors = self.checkpoint.read(names.values(), self.device, self.dtype)
            return {k: tensors[n] for k, n in names.items()}
        if isinstance(entry.saved, dict):
            return {k: v.to(self.device) for k, v in entry.saved.items()}
        from safetensors.torch import load_file

        return load_file(entry.saved, device=str(self.device))

    def _source_names(self, index: int) -> list[tuple[str, str]]:
        """(name within the layer, checkpoint name) of original layer `index`."""
        prefix = f"{self.adapter.layers_path}.{index}."
        return [(n[len(prefix) :], n) for n in self.checkpoint.names if n.startswith(prefix) and n[len(prefix) :] in self._layer_keys]

    def tensor_name(self, name: str) -> str:
        """Checkpoint name holding model tensor `name` (a tied LM head reads the embeddings)."""
        if name in self.checkpoint.file_of:
            return name
        if name == f"{self.adapter.lm_head_path}.weight" and getattr(self.model.config, "tie_word_embeddings", False):
            return f"{self.adapter.embed_path}.weight"
        raise ModelLoadError(f"the checkpoint has no tensor {name!r}")

    def _reader(self, name: str):
        return lambda: self.checkpoint.read([name], "cpu", self.dtype)[name]

    @staticmethod
    def _saved_reader(path: Path, key: str):
        def read():
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return f.get_tensor(key)

        return read

    def _load_module(self, path: str) -> nn.Module:
        shell = self.model.get_submodule(path)
        names = {k: self.tensor_name(f"{path}.{k}") for k in shell.state_dict()}
        tensors = self.checkpoint.read(set(names.values()), self.device, self.dtype)
        return self._materialise(shell, {k: tensors[n] for k, n in names.items()})

    @staticmethod
    def _materialise(shell: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        module = copy.deepcopy(shell)  # the shell itself stays on meta, so a held copy never turns empty
        module.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            raise ComeError(f"{type(module).__name__} has tensors outside its state dict; layer-wise mode cannot build it")
        return module

    def _set(self, entries: list[_Entry]) -> None:
        kept = set(entries)
        for entry in [e for e in self._loaded if e not in kept]:
            del self._loaded[entry]
        self.entries = entries
        self.adapter.set_layers(self.model, [e.shell for e in entries])


def check_checkpoint(model: nn.Module, adapter: Adapter, checkpoint: Checkpoint) -> None:
    """Every model tensor must be in the checkpoint under its own name (a tied LM head excepted)."""
    names = set(checkpoint.file_of)
    head = f"{adapter.lm_head_path}.weight"
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [n for n in model.state_dict() if n not in names and not (tied and n == head)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"layer-wise mode reads tensors by their model names; the checkpoint lacks {shown}")
    # Layers the config does not know of: the config would silently drop them.
    prefix, count = adapter.layers_path + ".", len(adapter.layers(model))
    extra = sorted({n for n in names if n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) >= count})
    if extra:
        shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        raise ModelLoadError(f"the weights do not match config.json (unexpected weights: {shown}); "
                             "is num_hidden_layers wrong?")
