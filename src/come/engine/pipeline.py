"""The compression driver: target resolution, the shared context methods work on, and `compress()`."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.activations import BoundaryStore, choose_storage
from ..core.adapters import Adapter, adapter_for
from ..core.scoring import BoundaryCache, ModelLayers
from ..errors import InvalidTarget, ModelLoadError
from ..evaluation import data as data_mod
from ..methods import DEFAULT_METHOD
from . import models as models_mod
from .models import LoadedModel, count_parameters, parse_dtype
from .options import CompressionOptions, resolve_options
from .precision import autocast_context, uses_autocast


# -- targets ----------------------------------------------------------------
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


# -- context shared by all methods (options: options.py) ----------------------
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
    # Where an original-model boundary goes once the current one replaces it (None: it stays where it is).
    teacher_store: BoundaryStore | None = None
    _cache: BoundaryCache | None = None
    # The damping the latest refit's walk chose: where the next walk starts (fewer solves, same choice).
    damping_hint: float | None = None
    # What a method reports about how it ran, for the plan's `execution` record (e.g. the search's loss precision).
    execution_notes: dict = field(default_factory=dict)

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
            # `autocast` matters only to a float32 model: a bfloat16 or float16 one computes in its own precision.
            layer_precision = self.autocast(self.options.autocast, "layer_pass_precision", float32_only=True)
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
                loss_kind=self.options.search_loss,
                teacher_store=self.teacher_store,
                layer_precision=layer_precision,
            )
        return self._cache

    def autocast(self, mode: str, note: str, float32_only: bool = False):
        """The context factory of passes run with autocast `mode` (auto | on | off; with `float32_only`, off for a
        model that is not float32), the precision it means noted in the plan's execution record as `note`."""
        dtype = self.layers.dtype
        on = uses_autocast(self.layers.device, mode) and (dtype == torch.float32 or not float32_only)
        self.execution_notes[note] = "bfloat16 autocast" if on else str(dtype).removeprefix("torch.")
        return autocast_context(self.layers.device, "on" if on else "off")

    def pass_counts(self) -> dict:
        """Decoder-layer passes so far: boundary updates (`layers_run`) and every pass, what-if losses and
        refits included, in whole-calibration-set equivalents (`layer_passes`); 0 if nothing ran."""
        cache = self._cache
        return {"layers_run": cache.layers_run if cache is not None else 0,
                "layer_passes": round(cache.layer_passes, 2) if cache is not None else 0}

    def release(self) -> None:
        """Free the calibration activations and every materialised layer (before the result is written)."""
        self._cache = None
        self.layers.release()

    def refresh(self, start: int) -> None:
        # Lazy: the next score recomputes; the reference mode reruns every layer.
        self.cache.release_teacher(r["covers"] for r in self.records)  # first: a released one is not moved to disk
        self.cache.invalidate_from(start if self.options.incremental else 0)

    def protected(self, k: int) -> bool:
        """Current layer k stands for one of the first `protect_first` original layers."""
        return self.records[k]["covers"][0] < self.options.protect_first

    def window_eligible(self, start: int, size: int) -> bool:
        """Layers start..start+size-1 may be merged: none protected, and none merged before unless re-merging is on."""
        window = range(start, start + size)
        if any(self.protected(k) for k in window):
            return False
        return self.options.allow_remerge or not any(self.records[k]["merged"] for k in window)

    def merge_window(self, start: int, new_layer: nn.Module, size: int, merge_record: dict, refit: dict | None = None) -> None:
        """Replace layers start..start+size-1 by `new_layer` and update the cache from `start` on.

        With `options.refit`, the new layer is refitted to the span it stands for, unless `refit`
        (the record of a refit the caller already applied to `new_layer`) is given.
        """
        cache = self.cache  # built before the layer list changes, so its kwargs line up
        self.layers.replace(start, size, new_layer)
        covers = [c for r in self.records[start : start + size] for c in r["covers"]]
        source = start + int(merge_record.get("position", 0))  # the source whose type the merged layer took
        position = self.records[source]["position_of"]
        self.records[start : start + size] = [{"covers": covers, "position_of": position, "merged": True, "merge": merge_record}]
        cache.replace_kwargs(start, size, source)
        self.refresh(start)
        if refit is not None:
            self.records[start]["refit"] = refit
        elif self.options.refit:
            self.apply_refit(start, *self.refit_candidate(start))

    def remove_layers(self, removed: list[int], refitted: dict[int, tuple[nn.Module, dict]] | None = None) -> list[int]:
        """Delete layers; each removed span is accounted to the kept layer before it (or after, at the start).

        Returns the new indices of the layers that took over a removed span. With `options.refit`
        they are refitted in order (each on the input its refitted predecessors give it), except
        those in `refitted` ({new index: (layer, refit record)}), already refitted by the caller.
        """
        removed = sorted(set(removed))
        keep = [k for k in range(self.num_layers) if k not in removed]
        if not keep:
            raise InvalidTarget("cannot remove every layer")
        owners = set()
        for k in removed:
            owner = max([j for j in keep if j < k], default=min(keep))
            owners.add(owner)
            self.records[owner]["covers"] = sorted(self.records[owner]["covers"] + self.records[k]["covers"])
        self.layers.keep(keep)
        self.records = [self.records[k] for k in keep]
        if self._cache is not None:
            self._cache.keep_kwargs(keep)
            self.refresh(min(removed))
        new_owners = sorted(keep.index(j) for j in owners)
        for j in new_owners:
            if refitted is not None and j in refitted:
                self.apply_refit(j, *refitted[j])
            elif self.options.refit:
                self.apply_refit(j, *self.refit_candidate(j))
        return new_owners

    # -- output refit ---------------------------------------------------------
    def refit_candidate(
        self, k: int, layer: nn.Module | None = None, covers: list[int] | None = None, kwargs: dict | None = None
    ) -> tuple[nn.Module, dict]:
        """(refitted copy, record) of `layer` (default: current layer k) standing at position k for the
        original layers `covers` (default: layer k's), fed the current boundary h_k with the layer
        kwargs `kwargs` (default: position k's)."""
        from ..core.refit import refit_layer

        cache = self.cache
        cache.boundary(k)
        layer = self.layers[k] if layer is None else layer
        covers = self.records[k]["covers"] if covers is None else covers
        new_layer, record = refit_layer(
            cache, k, layer, cache.layer_kwargs[k] if kwargs is None else kwargs, covers[-1] + 1, self.adapter,
            self.options.refit_damping, start=self.damping_hint,
        )
        if record.get("damping") is not None and "held_out_errors" in record:  # a walk chose it
            self.damping_hint = record["damping"]
        record["covers"] = [covers[0], covers[-1]]
        return new_layer, record

    def apply_refit(self, k: int, layer: nn.Module, record: dict) -> None:
        """Put a refitted layer in place of layer k (same span, same position)."""
        if record.get("applied", True):
            self.layers.replace(k, 1, layer)
            self.refresh(k)
        self.records[k]["refit"] = record


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
    method: str = DEFAULT_METHOD,
    out: str | Path | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    tokens: torch.Tensor | None = None,
    layerwise: bool = False,
    max_shard_size: str | int = "2GB",
    save_dtype: str | None = None,
    **options,
) -> CompressionResult:
    """Compress a causal LM to fewer decoder layers; optionally write it to `out`.

    `model` is a folder, a .gguf file, a hub id, an already loaded `LoadedModel`
    or None for the embedded default. `tokens` ([n, seqlen] ids) replaces the
    calibration source. `options` are `CompressionOptions` fields.

    Weights are saved in `save_dtype`, by default the source checkpoint's (a GGUF: bfloat16),
    whatever `dtype` they were computed in.

    `layerwise=True` (a local safetensors folder, or the default model) never
    holds the model: layers are read from the checkpoint one at a time and the
    output is streamed into shards of at most `max_shard_size`; the result's
    `model` is then a meta-device skeleton (structure and config, no weights).
    """
    from ..artifacts.export import resolve_save_dtype
    from ..artifacts.plan import build_plan, finalize_model
    from ..methods import get_method, get_spec
    from ..outputs import prepare_output, work_folder
    from .execution import open_execution

    # Resolve: the method, its options and how it runs; every refusal comes before any work.
    run = get_method(method)
    opts = resolve_options(get_spec(method).defaults_for(options), options)
    execution = open_execution(model, opts, method=method, layerwise=layerwise, dtype=dtype, device=device,
                               max_shard_size=max_shard_size)
    sources = source_paths(model)
    out_dir = prepare_output(out, overwrite, sources) if out is not None else None
    execution.check_save()
    if save_dtype is not None:
        parse_dtype(save_dtype)
    started = time.perf_counter()
    # Load.
    loaded = execution.load()
    adapter = adapter_for(loaded.model.config)
    original_layers = len(adapter.layers(loaded.model))
    original_params = count_parameters(loaded.model)
    target = resolve_target(loaded.model, adapter, ratio, target_layers)
    # Calibrate.
    tokens = calibration_tokens(loaded, tokens, opts)
    storage = choose_storage(opts.activation_storage, activation_bytes(loaded.model, adapter, tokens, opts))
    # Disk storage works in a private folder (under --cache-dir if given), removed at the end.
    work_root = Path(opts.cache_dir).expanduser() if opts.cache_dir else models_mod.cache_dir() / "work"
    # With boundaries in RAM, the original model's ones that later steps replace move to disk (refit and
    # skip-error targets, read a batch at a time), so RAM holds one set of boundaries, not two. Only an
    # in-memory run with RAM storage can do without the folder: it then keeps them in RAM.
    try:
        workspace = work_folder(work_root)
    except OSError:
        if storage != "ram" or execution.layerwise:
            raise
        workspace = nullcontext()
    with workspace as work:
        layers = execution.layers(loaded.model, adapter, work)
        torch.manual_seed(opts.seed)
        ctx = CompressionContext(loaded.model, loaded.tokenizer, adapter, tokens, opts, layers=layers,
                                 store=BoundaryStore(storage, work),
                                 teacher_store=BoundaryStore("disk", work) if storage == "ram" and work else None)
        loop_started = time.perf_counter()
        if opts.refit:
            _ = ctx.cache  # the refit's targets are the original model's boundaries: capture them first
        # Run the method.
        run(ctx, target)
        loop_seconds = time.perf_counter() - loop_started
        # Build the plan.
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
        plan["execution"] = execution_record(execution, ctx, storage, loop_seconds)
        saved_as, why = resolve_save_dtype(save_dtype, loaded.source, dtype)
        plan["save_dtype"] = {"dtype": saved_as, "why": why}
        # Save.
        ctx.release()  # the calibration activations and loaded layers go before the result is written
        result = CompressionResult(ctx.model, loaded.tokenizer, plan)
        if out_dir is not None:
            result.out_dir = execution.save(ctx.layers, loaded.tokenizer, plan, out_dir, overwrite=overwrite,
                                            sources=sources, save_dtype=parse_dtype(saved_as))
    return result


def calibration_tokens(loaded: LoadedModel, tokens: torch.Tensor | None, opts: CompressionOptions) -> torch.Tensor:
    """The calibration token ids: `tokens` if given (recorded as such in `opts`), else sampled from
    `opts.calib` with the model's tokenizer."""
    if tokens is not None:
        opts.calib, (opts.nsamples, opts.seqlen) = "tokens", tuple(tokens.shape)
        return tokens
    if loaded.tokenizer is None:
        raise ModelLoadError("the model folder has no tokenizer to read the calibration text with")
    return data_mod.calibration_tokens(loaded.tokenizer, opts.calib, opts.nsamples, opts.seqlen, seed=opts.seed)


def execution_record(execution, ctx: CompressionContext, storage: str, method_seconds: float) -> dict:
    """The plan's `execution` entry: how the run went (mode, device, dtype, where activations were, passes, time)."""
    record = {
        "layerwise": execution.layerwise,
        "device": str(ctx.layers.device),
        "dtype": str(ctx.layers.dtype).removeprefix("torch."),
        "activations": storage,
        **execution.settings(),
        # layer_passes: every decoder-layer pass (what-if losses, refits included) in whole-calibration-set equivalents.
        **ctx.pass_counts(),
        **ctx.execution_notes,
        "method_seconds": round(method_seconds, 2),  # calibration passes, scores and merges
        **execution.counters(),
    }
    if ctx.layers.device.type == "cuda":
        record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(ctx.layers.device) / 2**30, 3)
    return record


def source_paths(model) -> list:
    """Paths an output must not touch: the model argument, or a built-in model's cached folder."""
    from .models import BUILTINS, DEFAULT_MODEL

    if isinstance(model, LoadedModel):  # already loaded: protect the folder it came from, if any
        path = (model.source or {}).get("path")
        return [Path(path)] if path else []
    if model is None or model in BUILTINS:
        return [models_mod.cache_dir() / "models" / BUILTINS[model or DEFAULT_MODEL][0]]
    return [model] if isinstance(model, (str, Path)) else []


def activation_bytes(model: nn.Module, adapter: Adapter, tokens: torch.Tensor, opts: CompressionOptions) -> int:
    """Size of every boundary activation of the calibration set (what BoundaryCache keeps).

    With the output refit the original model's boundaries are kept too, so up to twice as much."""
    element = torch.empty((), dtype=parse_dtype(opts.activation_dtype)).element_size()
    copies = 2 if opts.refit else 1
    return copies * (len(adapter.layers(model)) + 1) * tokens.numel() * model.config.hidden_size * element
