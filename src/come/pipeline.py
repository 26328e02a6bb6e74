"""The compression driver: target resolution, the shared context methods work on, and `compress()`."""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import data as data_mod
from . import models as models_mod
from .activations import BoundaryStore, choose_storage
from .adapters import Adapter, adapter_for
from .errors import InvalidTarget, ModelLoadError
from .models import LoadedModel, load_model, parse_dtype, resolve_device
from .scoring import BoundaryCache, ModelLayers


# -- targets ----------------------------------------------------------------
def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def layer_parameters(adapter: Adapter, model: nn.Module) -> int:
    return sum(p.numel() for p in adapter.layers(model)[0].parameters())


def resolve_target(model: nn.Module, adapter: Adapter, ratio: float | None, target_layers: int | None) -> int:
    """Number of decoder layers to keep."""
    num_layers = len(adapter.layers(model))
    if (ratio is None) == (target_layers is None):
        raise InvalidTarget("give exactly one of --ratio or --target-layers")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise InvalidTarget(f"--ratio must be in (0, 1), got {ratio}")
        per_layer, total = layer_parameters(adapter, model), count_parameters(model)
        remove = round(ratio * total / per_layer)
        if remove < 1:
            smallest = 0.5 * per_layer / total
            raise InvalidTarget(
                f"--ratio {ratio} removes no layer (one layer is {per_layer / total:.1%} of the parameters; "
                f"use at least {smallest:.3f})"
            )
        target_layers = num_layers - remove
        if target_layers < 1:
            raise InvalidTarget(
                f"--ratio {ratio} would remove every layer (the {num_layers} decoder layers hold "
                f"{num_layers * per_layer / total:.1%} of the parameters)"
            )
    assert target_layers is not None
    if target_layers >= num_layers:
        raise InvalidTarget(f"--target-layers {target_layers} removes no layer: the model has {num_layers}")
    if target_layers < 1:
        raise InvalidTarget(f"--target-layers {target_layers} would remove every layer; keep at least 1")
    return target_layers


# -- context shared by all methods --------------------------------------------
@dataclass
class CompressionOptions:
    calib: str = "wikipedia"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    merge_size: int = 2
    allow_remerge: bool = False
    norm: str = "fold"
    sbi_tokens: str = "last"  # or "all"
    incremental: bool = True  # False reruns every layer after each merge (reference mode)
    # Calibration activations: their dtype (scores are accumulated in float32 regardless),
    # where they live (auto: disk when they would fill over half of free memory) and the disk folder.
    activation_dtype: str = "float32"
    activation_storage: str = "auto"
    cache_dir: str | None = None
    progress: bool = True
    # come-p: the first layer's channel share is searched over {0, 1/G, ..., 1}.
    granularity: int = 20
    # Calibration sequences used by the what-if searches (come-p, sleb, laco); None = all.
    search_samples: int | None = None
    # laco: similarity thresholds tried from high to low until one reaches the target,
    # the step down after an accepted merge, and the lowest layer a merge may start at.
    laco_thresholds: tuple = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    laco_interval: int = 2
    laco_min_layer: int = 1


@dataclass
class CompressionContext:
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    tokens: torch.Tensor
    options: CompressionOptions
    # For every current layer: the original layers it stands for, the original layer whose
    # position (layer type, attention kwargs) it takes, and the merge that made it.
    records: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    # Access to the decoder layers (the model's own by default; `LazyLayers` in layer-wise mode)
    # and where calibration boundaries are kept (RAM by default).
    layers: ModelLayers | None = None
    store: BoundaryStore | None = None
    _cache: BoundaryCache | None = None

    def __post_init__(self):
        if self.layers is None:
            self.layers = ModelLayers(self.model, self.adapter)
        if not self.records:
            self.records = [{"covers": [i], "position_of": i, "merged": False, "merge": None} for i in range(self.num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        return self.model.config

    def describe(self, k: int) -> str:
        covers = self.records[k]["covers"]
        return f"layer {k} (original {covers[0]})" if len(covers) == 1 else f"layer {k} (original {covers[0]}-{covers[-1]})"

    @property
    def cache(self) -> BoundaryCache:
        if self._cache is None:
            self._cache = BoundaryCache(
                self.model,
                self.adapter,
                self.tokens,
                batch_size=self.options.batch_size,
                progress=self.options.progress,
                layer_name=self.describe,
                storage_dtype=parse_dtype(self.options.activation_dtype),
                layers=self.layers,
                store=self.store,
            )
        return self._cache

    def refresh(self, start: int) -> None:
        # Lazy: the next score recomputes; the reference mode reruns every layer.
        self.cache.invalidate_from(start if self.options.incremental else 0)

    def merge_window(self, start: int, new_layer: nn.Module, size: int, merge_record: dict) -> None:
        """Replace layers start..start+size-1 by `new_layer` and update the cache from `start` on."""
        cache = self.cache  # built before the layer list changes, so its kwargs line up
        self.layers.replace(start, size, new_layer)
        covers = [c for r in self.records[start : start + size] for c in r["covers"]]
        position = self.records[start]["position_of"]
        self.records[start : start + size] = [{"covers": covers, "position_of": position, "merged": True, "merge": merge_record}]
        cache.layer_kwargs[start : start + size] = [cache.layer_kwargs[start]]
        self.refresh(start)

    def remove_layers(self, removed: list[int]) -> None:
        """Delete layers; each removed span is accounted to the kept layer before it (or after, at the start)."""
        removed = sorted(set(removed))
        keep = [k for k in range(self.num_layers) if k not in removed]
        if not keep:
            raise InvalidTarget("cannot remove every layer")
        for k in removed:
            owner = max([j for j in keep if j < k], default=min(keep))
            self.records[owner]["covers"] = sorted(self.records[owner]["covers"] + self.records[k]["covers"])
        self.layers.keep(keep)
        self.records = [self.records[k] for k in keep]
        if self._cache is not None:
            self._cache.layer_kwargs = [self._cache.layer_kwargs[k] for k in keep]
            self.refresh(min(removed))


@dataclass
class CompressionResult:
    model: nn.Module
    tokenizer: object
    plan: dict
    out_dir: Path | None = None


def compress(
    model: str | LoadedModel | None = None,
    *,
    ratio: float | None = None,
    target_layers: int | None = None,
    method: str = "come",
    out: str | Path | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    tokens: torch.Tensor | None = None,
    layerwise: bool = False,
    max_shard_size: str | int = "2GB",
    **options,
) -> CompressionResult:
    """Compress a causal LM to fewer decoder layers; optionally write it to `out`.

    `model` is a folder, a .gguf file, a hub id, an already loaded `LoadedModel`
    or None for the embedded default. `tokens` ([n, seqlen] ids) replaces the
    calibration source. `options` are `CompressionOptions` fields.

    `layerwise=True` (a local safetensors folder, or the default model) never
    holds the model: layers are read from the checkpoint one at a time and the
    output is streamed into shards of at most `max_shard_size`; the result's
    `model` is then a meta-device skeleton (structure and config, no weights).
    """
    from .export import build_plan, finalize_model, prepare_output, save_compressed
    from .methods import check_layerwise, get_method

    opts = CompressionOptions(**options)
    run = get_method(method)
    if layerwise:
        check_layerwise(method)
        if isinstance(model, LoadedModel):
            raise InvalidTarget("--layerwise reads the model from its folder; pass the folder, not a loaded model")
    out_dir = prepare_output(out, overwrite) if out is not None else None  # fail fast, before any work
    if layerwise:
        from .layerwise import parse_size

        parse_size(max_shard_size)  # a typo here should not cost a whole run
    started = time.perf_counter()
    checkpoint = None
    if layerwise:
        from .layerwise import load_layerwise

        loaded, checkpoint = load_layerwise(model, dtype=dtype, device=device)
    else:
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    adapter = adapter_for(loaded.model.config)
    original_layers = len(adapter.layers(loaded.model))
    original_params = count_parameters(loaded.model)
    target = resolve_target(loaded.model, adapter, ratio, target_layers)
    if tokens is None:
        if loaded.tokenizer is None:
            raise ModelLoadError("the model folder has no tokenizer to read the calibration text with")
        tokens = data_mod.calibration_tokens(loaded.tokenizer, opts.calib, opts.nsamples, opts.seqlen, seed=opts.seed)
    else:
        opts.calib, (opts.nsamples, opts.seqlen) = "tokens", tuple(tokens.shape)
    storage = choose_storage(opts.activation_storage, activation_bytes(loaded.model, adapter, tokens, opts))
    # Layer-wise runs expect memory to be short: merged layers go to disk unless RAM was asked for.
    merged_on_disk = layerwise and opts.activation_storage != "ram"
    # Disk storage works in a private folder (under --cache-dir if given), removed at the end.
    work_root = Path(opts.cache_dir).expanduser() if opts.cache_dir else models_mod.cache_dir() / "work"
    use_disk = storage == "disk" or merged_on_disk
    if use_disk:
        work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="come-work-", dir=work_root) if use_disk else nullcontext() as work:
        layers = None
        if layerwise:
            from .layerwise import LazyLayers, save_layerwise

            layers = LazyLayers(
                loaded.model, adapter, checkpoint, resolve_device(device), parse_dtype(dtype),
                merged_dir=work if merged_on_disk else None,
            )
        torch.manual_seed(opts.seed)
        ctx = CompressionContext(
            loaded.model, loaded.tokenizer, adapter, tokens, opts, layers=layers, store=BoundaryStore(storage, work)
        )
        loop_started = time.perf_counter()
        run(ctx, target)
        loop_seconds = time.perf_counter() - loop_started
        finalize_model(ctx)
        plan = build_plan(
            ctx,
            method=method,
            source=loaded.source,
            original_layers=original_layers,
            original_params=original_params,
            ratio=ratio,
            seconds=time.perf_counter() - started,
        )
        plan["execution"] = {
            "layerwise": layerwise,
            "device": str(ctx.layers.device),
            "dtype": str(ctx.layers.dtype).removeprefix("torch."),
            "activations": storage,
            **({"merged_layers": "disk" if merged_on_disk else "ram"} if layerwise else {}),
            "layers_run": ctx._cache.layers_run if ctx._cache is not None else 0,
            "method_seconds": round(loop_seconds, 2),  # calibration passes, scores and merges
            **({"layer_loads": layers.loads, "peak_layers_loaded": layers.peak_live} if layers is not None else {}),
        }
        if ctx.layers.device.type == "cuda":
            plan["execution"]["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(ctx.layers.device) / 2**30, 3)
        ctx._cache = None  # release the calibration activations before writing
        ctx.layers.release()
        result = CompressionResult(ctx.model, loaded.tokenizer, plan)
        if out_dir is not None and layerwise:
            result.out_dir = save_layerwise(layers, loaded.tokenizer, plan, out_dir, overwrite, max_shard_size)
        elif out_dir is not None:
            result.out_dir = save_compressed(ctx.model, loaded.tokenizer, plan, out_dir, overwrite=overwrite)
    return result


def activation_bytes(model: nn.Module, adapter: Adapter, tokens: torch.Tensor, opts: CompressionOptions) -> int:
    """Size of every boundary activation of the calibration set (what BoundaryCache keeps)."""
    element = torch.empty((), dtype=parse_dtype(opts.activation_dtype)).element_size()
    return (len(adapter.layers(model)) + 1) * tokens.numel() * model.config.hidden_size * element
