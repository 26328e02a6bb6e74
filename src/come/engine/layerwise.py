"""Layer-wise mode: compress a model larger than memory, one decoder layer at a time.

`load_layerwise` builds the model on the meta device (structure, no weights) from a local safetensors
folder; `lazy_layers.LazyLayers` gives the methods its decoder layers one at a time from the checkpoint
(`checkpoint.Checkpoint`); `write_layerwise` streams every output tensor, renamed to its new layer index,
into size-limited safetensors shards without ever building the model. `execution.Layerwise` puts them
together for `compress()`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.adapters import adapter_for
from ..errors import ModelLoadError
from .checkpoint import Checkpoint, parse_size, write_safetensors, write_shards
from .lazy_layers import LazyLayers, check_checkpoint
from .models import BUILTINS, LoadedModel, has_tokenizer, parse_dtype, resolve_device, resolve_source

# Their home was this module; still importable from it.
__all__ = ["Checkpoint", "LazyLayers", "check_checkpoint", "load_layerwise", "parse_size", "write_layerwise",
           "write_safetensors"]


def load_layerwise(source: str | None, dtype: str | torch.dtype = "float32", device: str = "cpu") -> tuple[LoadedModel, Checkpoint]:
    """A meta-device model of the safetensors folder `source` (None: the embedded default) and its checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if source is not None and source not in BUILTINS and not Path(source).expanduser().is_dir():
        raise ModelLoadError(f"--layerwise needs a local model folder of safetensors files; {source!r} is not one")
    path, info = resolve_source(source)
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
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None
    return LoadedModel(model, tokenizer, info), checkpoint


def write_layerwise(layers: LazyLayers, folder: Path, max_shard_size: str | int = "2GB",
                    save_dtype: torch.dtype | None = None) -> None:
    """The weights (streamed, in shards of at most `max_shard_size`), config and generation config of the
    model `layers` stand for, into `folder`; floating tensors in `save_dtype` (default: as computed)."""
    items = layers.model_tensors()
    if save_dtype is not None:
        items = [(n, save_dtype if d.is_floating_point else d, shape,
                  (lambda read=read, d=d: read().to(save_dtype) if d.is_floating_point else read()))
                 for n, d, shape, read in items]
    write_shards(folder, items, max_shard_size)
    model = layers.model
    model.config.architectures = [type(model).__name__]
    if save_dtype is not None:
        model.config.dtype = save_dtype
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
