"""Calibration pass and every score computed from it.

`BoundaryCache` keeps the hidden state at every layer boundary (h_0 = the
input of layer 0, h_l = the output of layer l-1) for the whole calibration set.
Scores that compare boundaries (block influence, window distance) read the
cache; channel sensitivities rerun just the layer asked for. After a merge only
the layers from the merge point on are rerun, since everything before it is
unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ComeError, NonFiniteActivations
from .activations import BoundaryStore
from .adapters import Adapter

# Logits of candidate losses are formed at most this many bytes at a time (a batch of 8 sequences of 128
# tokens over a 49k vocabulary would be 200 MB, and its log-softmax as much again).
HEAD_CHUNK_BYTES = 32 * 2**20


class _StopForward(Exception):
    pass


def layer_output(out) -> torch.Tensor:
    """The hidden state a decoder layer returns (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_boundaries(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, boundaries: set[int], with_kwargs: bool = False
) -> tuple[dict[int, torch.Tensor], list[dict]]:
    """Run the model's own forward and record the hidden state at `boundaries`
    (b < L: entering layer b; b = L: leaving the last layer), stopping as soon as
    the deepest one is seen. With `with_kwargs`, also the keyword arguments of
    every layer up to the deepest boundary (at most layer L-1).

    Taking the attention mask and rotary embeddings from the model itself keeps
    every family's quirks (sliding windows, embedding scaling) out of this code.
    """
    layers = adapter.layers(model)
    n, deepest = len(layers), max(boundaries)
    states: dict[int, torch.Tensor] = {}
    kwargs_of: dict[int, dict] = {}

    def keep(b, h):
        states[b] = h
        if b == deepest:
            raise _StopForward

    def pre_hook(idx):
        def hook(module, args, kwargs):
            if with_kwargs:
                kwargs_of[idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if idx in boundaries:
                keep(idx, args[0] if args else kwargs["hidden_states"])
        return hook

    hooked = range(min(deepest, n - 1) + 1) if with_kwargs else [b for b in boundaries if b < n]
    handles = [layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in hooked]
    if n in boundaries:
        handles.append(layers[-1].register_forward_hook(lambda m, a, out: keep(n, layer_output(out))))
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return states, [kwargs_of[i] for i in sorted(kwargs_of)]


def capture_layer_inputs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, all_layers: bool):
    """(hidden state entering layer 0, [kwargs of layer l] for every layer, or layer 0 only)."""
    last = len(adapter.layers(model)) - 1 if all_layers else 0
    states, kwargs = capture_boundaries(model, adapter, input_ids, {0, last}, with_kwargs=True)
    return states[0], kwargs


def all_finite(t: torch.Tensor) -> bool:
    """`torch.isfinite(t).all()`, mostly from one sum instead of a boolean copy of `t`: a NaN or an infinity
    makes the sum non-finite, so a finite sum proves every entry finite; a sum that overflows from finite
    entries takes the full check."""
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def mean_loss(parts: tuple[float, int]) -> float:
    """Per-token loss from (sum, count). A stack whose output overflows (NaN/Inf) scores +inf, so no
    search prefers it to a finite one (min() over a list holding NaN depends on its position); plans
    record it as null."""
    total, count = parts
    return total / count if math.isfinite(total) else math.inf


class ModelLayers:
    """Decoder layers of a model held in memory: its own ModuleList.

    The layer-wise mode swaps in `lazy_layers.LazyLayers` (same interface), which
    materialises one layer at a time from the checkpoint; the code that scores
    and merges layers only goes through this interface.
    """

    def __init__(self, model: nn.Module, adapter: Adapter):
        self.model, self.adapter = model, adapter

    def __len__(self) -> int:
        return len(self.adapter.layers(self.model))

    def __getitem__(self, k: int) -> nn.Module:
        return self.adapter.layers(self.model)[k]

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def replace(self, start: int, size: int, new_layer: nn.Module) -> None:
        layers = self.adapter.layers(self.model)
        self.adapter.set_layers(self.model, list(layers[:start]) + [new_layer] + list(layers[start + size :]))

    def keep(self, indices: list[int]) -> None:
        layers = self.adapter.layers(self.model)
        self.adapter.set_layers(self.model, [layers[k] for k in indices])

    def capture(self):
        """Context in which the model's own forward can run up to its decoder layers."""
        return nullcontext()

    @contextmanager
    def head(self):
        """(final norm, LM head) for the duration of the context."""
        yield self.model.get_submodule(self.adapter.final_norm_path), self.model.get_submodule(self.adapter.lm_head_path)

    def release(self) -> None:
        pass


class BoundaryCache:
    """Hidden states h_0..h_L of the calibration set for the model's current layers."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        tokens: torch.Tensor,
        batch_size: int = 8,
        storage_dtype: torch.dtype = torch.float32,
        progress: bool = True,
        layer_name: Callable[[int], str] | None = None,
        layers: ModelLayers | None = None,
        store: BoundaryStore | None = None,
        loss_kind: str = "ce",
        teacher_store: BoundaryStore | None = None,
        layer_precision: Callable = nullcontext,
    ):
        self.model = model
        self.adapter = adapter
        self.layers = layers if layers is not None else ModelLayers(model, adapter)
        self.store = store if store is not None else BoundaryStore("ram")
        self.tokens = tokens
        self.batch_size = max(1, int(batch_size))
        self.storage_dtype = storage_dtype
        self.progress = progress
        self.layer_name = layer_name or (lambda k: f"layer {k}")
        self.device = self.layers.device
        self.compute_dtype = self.layers.dtype
        # The context every pass of a layer over the calibration set runs in (`run_layer`, the refit
        # statistics): bfloat16 autocast or nothing. What-if losses choose their own (the search's).
        self.layer_precision = layer_precision
        self.layers_run = 0  # counts decoder-layer passes over the whole set (for benchmarks)
        # Every decoder-layer pass (boundary updates, what-if losses, refits) in whole-set equivalents.
        self.layer_passes = 0.0
        self.teacher: list | None = None  # set once the original model's boundaries are computed
        self.teacher_store = teacher_store
        # {k: {"o": sum |x| over the calibration tokens entering layer k's o_proj, "down": likewise for
        # down_proj}}, gathered while the boundaries are computed: channel sensitivities without a layer pass.
        self.activation_sums: dict[int, dict[str, torch.Tensor]] = {}
        # Scores of boundaries no operation has changed since, kept until `_drop_from` drops a boundary they
        # read: the search asks for every layer's at every step, and most layers lie before the change.
        self._block_influence: dict[int, float] = {}  # l -> BI of layer l (reads h_l and h_{l+1})
        self._skip_errors: dict[tuple[int, int], float] = {}  # (k, target index) -> skip_error (reads h_k)
        self._teacher_norms: dict[int, float] = {}  # target index -> sum ||T||^2 (the teacher never changes)

        # Layer kwargs depend only on the sequence shape (no padding in
        # calibration), so one single-sequence capture serves every batch.
        n, s = tokens.shape
        with torch.no_grad(), self.layers.capture():
            _, kwargs = capture_layer_inputs(model, adapter, tokens[:1].to(self.device), all_layers=True)
            # kwargs of original layer l; a merged layer uses those of its first source.
            self.layer_kwargs: list[dict] = kwargs
            # Boundaries are tensors in RAM or `DiskBoundary` files; both are read by row ranges.
            self.h: list = [self.store.new((n, s, model.config.hidden_size), storage_dtype)]
            for b0 in range(0, n, self.batch_size):
                x, _ = capture_layer_inputs(model, adapter, tokens[b0 : b0 + self.batch_size].to(self.device), False)
                self.h[0][b0 : b0 + x.shape[0]] = x.to(storage_dtype).cpu()
        self.recompute_from(0)
        # The original model's boundaries: targets of the output refit. Later recomputations make
        # new tensors (or files), so holding these references keeps them as they are now.
        self.teacher = list(self.h)
        self.num_layers_original = self.num_layers
        self.loss_kind = loss_kind

    # -- execution ----------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def batches(self) -> list[tuple[int, int]]:
        """(first row, end row) of every batch of the calibration set, in order."""
        n = self.tokens.shape[0]
        return [(b0, min(n, b0 + self.batch_size)) for b0 in range(0, n, self.batch_size)]

    @torch.no_grad()
    def run_layer(self, k: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[k]
        with self.layer_precision():
            out = layer(x.to(self.device, self.compute_dtype), **self.layer_kwargs[k])
        return layer_output(out)

    def replace_kwargs(self, start: int, size: int, source: int) -> None:
        """Layers start..start+size-1 became one layer, which runs with the kwargs of layer `source`."""
        self.layer_kwargs[start : start + size] = [self.layer_kwargs[source]]

    def keep_kwargs(self, indices: list[int]) -> None:
        """Only layers `indices` remain (in that order)."""
        self.layer_kwargs = [self.layer_kwargs[k] for k in indices]

    def invalidate_from(self, start: int) -> None:
        """Layers from `start` on changed: h_{start+1}.. are recomputed when next needed."""
        self._drop_from(start)

    def _drop_from(self, start: int) -> None:
        """Delete h_{start+1}..; an original-model boundary the teacher still holds in RAM moves to
        `teacher_store` first (the same values), so that its memory goes back."""
        if self.teacher is not None and self.teacher_store is not None:
            for i in range(start + 1, min(len(self.h), len(self.teacher))):
                boundary = self.h[i]
                if self.teacher[i] is boundary and isinstance(boundary, torch.Tensor):
                    moved = self.teacher_store.new(boundary.shape, boundary.dtype)
                    moved[0 : boundary.shape[0]] = boundary
                    self.teacher[i] = moved
        del self.h[start + 1 :]
        self.activation_sums = {k: v for k, v in self.activation_sums.items() if k < start}
        self._block_influence = {l: v for l, v in self._block_influence.items() if l < start}
        self._skip_errors = {key: v for key, v in self._skip_errors.items() if key[0] <= start}

    def ensure_fresh(self) -> None:
        if len(self.h) < self.num_layers + 1:
            self.recompute_from(len(self.h) - 1)

    def boundary(self, k: int):
        """h_k, computing the boundaries up to it (and no further) if they are stale."""
        if len(self.h) <= k:
            self.recompute_from(len(self.h) - 1, until=k)
        return self.h[k]

    def count_passes(self, rows: int) -> None:
        self.layer_passes += rows / self.tokens.shape[0]

    @torch.no_grad()
    def recompute_from(self, start: int, until: int | None = None) -> None:
        """Recompute h_{start+1}..h_until (default h_L) by running layers start..until-1."""
        num = self.num_layers if until is None else until
        self._drop_from(start)
        steps = tqdm(
            range(start, num),
            desc="calibration pass",
            unit="layer",
            disable=not self.progress,
            leave=False,
        )
        for k in steps:
            out = self.store.new(self.h[k].shape, self.storage_dtype)
            with self._summing_activations(k) as sums:
                for b0, b1 in self.batches():
                    y = self.run_layer(k, self.h[k][b0:b1])
                    if not all_finite(y):
                        raise NonFiniteActivations(
                            f"non-finite activations (NaN/Inf) at the output of {self.layer_name(k)}"
                        )
                    out[b0:b1] = y.to(self.storage_dtype).cpu()
            self.h.append(out)
            self.activation_sums[k] = sums
            self.layers_run += 1
            self.layer_passes += 1

    # -- what-if passes (posterior searches and loss-based baselines) -----------
    def current_stack(self, start: int) -> list[tuple[int, dict]]:
        """(index, kwargs) of the current layers start..L-1, for `run_through` (which loads each when it runs)."""
        return [(k, self.layer_kwargs[k]) for k in range(start, self.num_layers)]

    @torch.no_grad()
    def run_through(self, start: int, stack: list[tuple[nn.Module | int, dict]], samples: int | None = None,
                    skip: int = 0):
        """Yield (batch slice, output) of feeding boundary h_start through `stack`, for sequences
        `skip`..`samples`-1 (default: all), in the calibration batches clipped to that range.

        A stack entry is (layer, kwargs): a module, or the index of a current layer. The pass
        runs layer by layer over every batch, so a current layer is fetched once per pass (one
        read from the checkpoint in layer-wise mode) and at most one is held at a time; the
        activations of the sequences it feeds stay on the compute device meanwhile.
        """
        self.boundary(start)
        batches = []
        for b0, b1 in self.batches():
            if samples is not None and b0 >= samples:
                break
            b0, b1 = max(b0, skip), (b1 if samples is None else min(b1, samples))
            if b0 < b1:
                batches.append((b0, b1))
        xs = [self.h[start][b0:b1].to(self.device, self.compute_dtype) for b0, b1 in batches]
        for layer, kwargs in stack:
            module = self.layers[layer] if isinstance(layer, int) else layer
            for i, (b0, b1) in enumerate(batches):
                out = module(xs[i], **kwargs)
                xs[i] = layer_output(out)
                self.count_passes(b1 - b0)
            del module
        for (b0, b1), x in zip(batches, xs):
            yield slice(b0, b1), x

    @torch.no_grad()
    def loss_through(self, start: int, stack: list[tuple[nn.Module, dict]], samples: int | None = None) -> float:
        """The calibration loss of the model with `stack` in place of layers start..L-1 (h_start fed
        through it, then the final norm and LM head), per token, by `self.loss_kind`:

        - "ce": next-token cross-entropy on the calibration text;
        - "kl": KL(original || model) of the next-token distributions, the original's read from its
          cached last boundary. Every vocabulary entry informs it, not only the one token that came
          next, so a few sequences rank candidates with less sampling noise.
        """
        return mean_loss(self.loss_sum_through(start, stack, samples))

    @torch.no_grad()
    def loss_sum_through(self, start: int, stack: list[tuple[nn.Module, dict]], samples: int | None = None,
                         skip: int = 0) -> tuple[float, int]:
        """(sum of the per-token losses, token count) of `loss_through` over sequences `skip`..`samples`-1.

        The sum is taken batch by batch in order, so the parts of a split at a multiple of the batch
        size add up (left to right) to the very float the whole range gives.
        """
        total, count = 0.0, 0
        kl = self.loss_kind == "kl"
        teacher = self.teacher_boundary(self.num_layers_original) if kl else None
        with self.layers.head() as (norm, head):
            for rows, x in self.run_through(start, stack, samples, skip):
                # The logits of a whole batch (rows x tokens x vocabulary) are the search's largest
                # tensor: they go through the head a few sequences at a time. Each token's log-softmax
                # is its own, so the per-token values, and their sum over the batch, are those of one pass.
                per_token = []
                # Read once per batch: a boundary on disk reads its rows from the file at every index.
                targets = teacher[rows] if kl else self.tokens[rows]
                for part in self._head_chunks(x, head):
                    logp = torch.log_softmax(head(norm(x[part]))[:, :-1].float(), dim=-1)
                    if kl:
                        t = targets[part].to(self.device, self.compute_dtype)
                        logq = torch.log_softmax(head(norm(t))[:, :-1].float(), dim=-1)
                        per_token.append((logq.exp() * (logq - logp)).sum(-1))
                    else:
                        labels = targets[part, 1:].to(logp.device)
                        per_token.append(-logp.gather(-1, labels.unsqueeze(-1)))
                per_token = torch.cat(per_token)
                total += float(per_token.sum())
                count += per_token.shape[0] * per_token.shape[1]
        return total, count

    @staticmethod
    def _head_chunks(x: torch.Tensor, head: nn.Module) -> list[slice]:
        """Slices of a batch's sequences whose float32 logits stay within HEAD_CHUNK_BYTES (one sequence at least)."""
        vocab = head.weight.shape[0]
        per_sequence = max(1, x.shape[1] * vocab * 4)
        size = max(1, HEAD_CHUNK_BYTES // per_sequence)
        return [slice(i, min(i + size, x.shape[0])) for i in range(0, x.shape[0], size)]

    def teacher_boundary(self, index: int):
        """The original model's boundary h_index (as cached before any change): refit and skip-error targets."""
        if self.teacher is None or index >= len(self.teacher):
            raise ComeError(f"no original-model boundary {index}: the cache was built after the model changed")
        if self.teacher[index] is None:
            raise ComeError(f"the original-model boundary {index} was released: it lies inside a merged span")
        return self.teacher[index]

    def release_teacher(self, spans) -> None:
        """Drop the original-model boundaries strictly inside the spans of original layers `spans` (lists of
        contiguous layer indices): a span only grows, so what enters or leaves it is all any refit or skip
        error can ask for, and the memory of the others goes back once no current boundary shares it."""
        if self.teacher is None:
            return
        for covers in spans:
            if list(covers) == list(range(covers[0], covers[-1] + 1)):  # boundary i enters original layer i
                for index in covers[1:]:
                    self.teacher[index] = None

    # -- scores ---------------------------------------------------------------
    def _cosine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)

    def block_influence(self) -> torch.Tensor:
        """BI_l = mean over tokens of 1 - clamp(cos(h_l, h_{l+1}), 0, 1)."""
        self.ensure_fresh()
        scores = []
        for l in range(self.num_layers):
            if l not in self._block_influence:
                total = 0.0
                for b0, b1 in self.batches():
                    cos = self._cosine(self.h[l][b0:b1], self.h[l + 1][b0:b1])
                    total += (1 - cos.clamp(0, 1)).double().sum().item()
                self._block_influence[l] = total / (self.tokens.numel())
            scores.append(self._block_influence[l])
        return torch.tensor(scores, dtype=torch.float64)

    def skip_error(self, k: int, target_index: int) -> float:
        """sum ||h_k - T||^2 / sum ||T||^2, T the original model's boundary `target_index`: how far the
        current model is from the original at the end of layer k's span if layer k is skipped (the
        owner of its span then outputs h_k). Computed from the cache alone, no layer pass."""
        self.boundary(k)
        teacher = self.teacher_boundary(target_index)
        if (k, target_index) not in self._skip_errors:
            num, den, known = 0.0, 0.0, target_index in self._teacher_norms
            for b0, b1 in self.batches():
                t = teacher[b0:b1].double()
                num += float((self.h[k][b0:b1].double() - t).pow(2).sum())
                if not known:
                    den += float(t.pow(2).sum())
            if not known:
                self._teacher_norms[target_index] = den
            self._skip_errors[(k, target_index)] = num / max(self._teacher_norms[target_index], 1e-30)
        return self._skip_errors[(k, target_index)]

    def window_distance(self, size: int, all_tokens: bool = False) -> torch.Tensor:
        """SBI_i = arccos(clamp(cos(h_i, h_{i+size}), -1, 1)) / pi for every window start i."""
        self.ensure_fresh()
        starts = self.num_layers - size + 1
        scores = []
        for i in range(starts):
            # Batch by batch (boundaries may be on disk); the mean is taken over all of them at once.
            angles = []
            for b0, b1 in self.batches():
                a, b = self.h[i][b0:b1], self.h[i + size][b0:b1]
                if not all_tokens:
                    a, b = a[:, -1:], b[:, -1:]
                cos = self._cosine(a, b).clamp(-1, 1).double()
                angles.append(torch.arccos(cos) / math.pi)
            scores.append(torch.cat(angles).mean().item())
        return torch.tensor(scores, dtype=torch.float64)

    @torch.no_grad()
    def channel_sensitivity(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per KV-group attention sensitivity and per-neuron FFN sensitivity of layer k.

        Each channel c read by a projection W gets mean_t |x_{t,c}| * ||W[:, c]||_1;
        a KV group's score is the mean over the o_proj input channels of its
        query heads (HF pairing: query head q belongs to group q // reps).
        """
        self.ensure_fresh()
        sums = self.activation_sums.get(k)
        if sums is None:  # not gathered since layer k or its input last changed: one pass over the set
            with self._summing_activations(k) as sums:
                for b0, b1 in self.batches():
                    self.run_layer(k, self.h[k][b0:b1])
        layer = self.layers[k]
        o_proj, down = self.adapter.o_proj(layer), self.adapter.down_proj(layer)
        ntok = self.tokens.numel()
        o_score = (sums["o"].cpu() / ntok) * o_proj.weight.detach().double().abs().sum(0).cpu()
        ffn_score = (sums["down"].cpu() / ntok) * down.weight.detach().double().abs().sum(0).cpu()
        cfg = self.model.config
        group_width = self.adapter.queries_per_group(cfg) * self.adapter.head_dim(cfg)
        attn_score = o_score.reshape(-1, group_width).mean(1)
        return attn_score, ffn_score.cpu()

    @contextmanager
    def _summing_activations(self, k: int):
        """Within the context, layer k's passes add sum |x| of the inputs of its o_proj and down_proj into
        the dict yielded (float64 sums of each batch's float32 sums, batch by batch in order)."""
        layer = self.layers[k]
        sums: dict[str, torch.Tensor] = {}

        def accumulate(name):
            def hook(module, args):
                x = args[0].detach().abs().float()  # the same values as .float().abs(), half the traffic in bfloat16
                sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1]).sum(0).double()
            return hook

        handles = [self.adapter.o_proj(layer).register_forward_pre_hook(accumulate("o")),
                   self.adapter.down_proj(layer).register_forward_pre_hook(accumulate("down"))]
        try:
            yield sums
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def output_norm_scales(self, k: int) -> dict[str, float]:
        """For each output norm of layer k (Gemma's post-norms): the mean over calibration tokens of
        1 / rms of what it normalises, i.e. the factor it typically applies before its gain."""
        layer = self.layers[k]
        sums: dict[str, float] = {}
        handles = []
        for norm_name in self.adapter.output_norms:
            def hook(mod, args, name=norm_name):
                x = args[0].float()
                sums[name] = sums.get(name, 0.0) + float(x.pow(2).mean(-1).add(mod.eps).rsqrt().sum())
            handles.append(layer.get_submodule(norm_name).register_forward_pre_hook(hook))
        try:
            for b0, b1 in self.batches():
                self.run_layer(k, self.boundary(k)[b0:b1])
                self.count_passes(b1 - b0)
        finally:
            for h in handles:
                h.remove()
        return {name: total / self.tokens.numel() for name, total in sums.items()}
