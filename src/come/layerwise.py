"""Layer-wise execution: compress a model larger than memory, one decoder layer at a time.

The model is built on the meta device (structure, no weights). Decoder layers
are read from the safetensors checkpoint (memory-mapped) when first used and
freed once no longer held; the embeddings exist only while the calibration
inputs are captured, the final norm and LM head only while a loss is computed.
Merged layers are kept as state dicts, in RAM or as files in the work folder;
untouched layers stay in the original files. The export streams every output
tensor, renamed to its new layer index, into size-limited safetensors shards
without ever building the model.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .errors import ComeError, ModelLoadError
from .models import BUILTINS, DEFAULT_MODEL, LoadedModel, checkpoint_dtype, parse_dtype, resolve_device

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_ST_FLOATS = {"F64", "F32", "F16", "BF16"}


# -- reading ------------------------------------------------------------------
class Checkpoint:
    """The tensors of a local safetensors checkpoint (one file, or shards with an index), read on demand."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        if (self.folder / INDEX_FILE).is_file():
            weight_map = json.loads((self.folder / INDEX_FILE).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ModelLoadError(
                f"layer-wise mode reads safetensors weights: {self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, safetensors dtype)
        for file in files:
            try:
                with safe_open(self.folder / file, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        piece = f.get_slice(name)
                        self.file_of[name] = self.folder / file
                        self.info[name] = (tuple(piece.get_shape()), piece.get_dtype())
            except Exception as exc:  # noqa: BLE001 SafetensorError on damaged headers, OSError on missing shards
                raise ModelLoadError(f"cannot read the weights in {self.folder / file}: {str(exc).splitlines()[0]}") from None


    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def spec(self, name: str, dtype: torch.dtype) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of `name` as read with floating tensors cast to `dtype`."""
        shape, st_dtype = self.info[name]
        return (dtype if st_dtype in _ST_FLOATS else _TORCH_DTYPES[st_dtype]), shape

    def read(self, names, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors `names` on `device`, floating ones cast to `dtype`; each file is opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return out


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
            specs = [(k, _TORCH_DTYPES[f.get_slice(k).get_dtype()], tuple(f.get_slice(k).get_shape())) for k in f.keys()]  # noqa: SIM118
        return [(k, dtype, shape, self._saved_reader(entry.saved, k)) for k, dtype, shape in specs]

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


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_layerwise(source: str | None, dtype: str | torch.dtype = "float32", device: str = "cpu") -> tuple[LoadedModel, Checkpoint]:
    """A meta-device model of the safetensors folder `source` (None: the embedded default) and its checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if source is None or source in BUILTINS:
        from .models import builtin_source

        path, info = builtin_source(source or DEFAULT_MODEL)
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"--layerwise needs a local model folder of safetensors files; {source!r} is not one")
        info = {"name": source, "kind": "local", "path": str(path.resolve()), "dtype": checkpoint_dtype(path)}
    config = AutoConfig.from_pretrained(path)
    adapter_for(config)
    checkpoint = Checkpoint(path)
    # Parameters on meta; buffers (rotary frequencies) are computed for real, they are not in checkpoints.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
    model.tie_weights()  # init_empty_weights makes fresh meta parameters, which unties the LM head
    model.config._attn_implementation = "sdpa"
    model.eval()
    target = resolve_device(device)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(target)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    return LoadedModel(model, tokenizer, info), checkpoint


# -- writing ------------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """Bytes in "2GB", "500MB", "200KB", "1GiB" or a plain number (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not match:
        raise ComeError(f"cannot read the size {size!r}; write it like 2GB, 500MB or 200KB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".find(unit[:1]) + 1 if unit else 0
    return int(number * base**power)


def write_safetensors(path: Path, items: list[tuple], metadata: dict | None = None) -> None:
    """Write a safetensors file one tensor at a time, so the file is never in memory as a whole.

    `items` are (name, dtype, shape, reader); the header is built from the
    dtypes and shapes, then each reader is called once and its bytes written.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in items:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, read in items:
            t = read()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ComeError(f"tensor {name}: expected {dtype} {tuple(shape)}, read {t.dtype} {tuple(t.shape)}")
            f.write(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def output_tensors(layers: LazyLayers) -> list[tuple]:
    """(name, dtype, shape, reader) of every tensor of the compressed model: the non-layer tensors of the
    checkpoint (not a tied LM head, as save_pretrained), then every layer under its new index."""
    model, adapter, checkpoint = layers.model, layers.adapter, layers.checkpoint
    prefix = adapter.layers_path + "."
    wanted = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        wanted.discard(f"{adapter.lm_head_path}.weight")
    items = [
        (n, *checkpoint.spec(n, layers.dtype), layers._reader(n))
        for n in checkpoint.names
        if n in wanted and not n.startswith(prefix)
    ]
    for j, entry in enumerate(layers.entries):
        items += [(f"{prefix}{j}.{rel}", dtype, shape, read) for rel, dtype, shape, read in layers.layer_tensors(entry)]
    return items


def save_layerwise(layers: LazyLayers, tokenizer, plan: dict, out: str | Path, overwrite: bool = False,
                   max_shard_size: str | int = "2GB", sources: list | None = None,
                   save_dtype: torch.dtype | None = None) -> Path:
    """Write the compressed model as a standard checkpoint folder (atomically), streaming its tensors;
    floating tensors are written in `save_dtype` (default: as computed)."""
    from .outputs import atomic_folder
    from .publish import write_metadata

    limit = parse_size(max_shard_size)
    shards: list[list[tuple]] = [[]]
    size = total = 0
    items = output_tensors(layers)
    if save_dtype is not None:
        items = [(n, save_dtype if d.is_floating_point else d, shape,
                  (lambda read=read, d=d: read().to(save_dtype) if d.is_floating_point else read()))
                 for n, d, shape, read in items]
    for item in items:
        nbytes = _numel(item[2]) * torch.empty((), dtype=item[1]).element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
        total += nbytes
    model = layers.model
    with atomic_folder(out, overwrite, sources) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / file, shard, metadata={"format": "pt"})
            weight_map.update({item[0]: file for item in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        model.config.architectures = [type(model).__name__]
        if save_dtype is not None:
            model.config.dtype = save_dtype
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        write_metadata(tmp, tokenizer, plan)
    return Path(out).expanduser().resolve()
