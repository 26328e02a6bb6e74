"""come-search: loss-guided merge-or-drop, with the output refit.

Every step removes one layer (a window of `merge_size` merges removes
`merge_size - 1`; the last window shrinks to land on the target) by the best
of these candidate operations on the current model:

- merge of each of the `search_windows` most redundant windows (lowest window
  distance; windows holding an earlier merge are allowed unless
  `allow_remerge` is off), once with CoMe's block-influence channel ratio and
  once for every first-layer share in `search_ratios`;
- deletion of each of the `search_deletions` layers of lowest skip error (the
  distance to the original model at the end of the layer's span when it is
  skipped; `search_deletion_rank=bi`: lowest block influence; `loss`: lowest
  loss without refit on a few sequences, SLEB's score of every layer;
  `error+loss`: in turn from both). The deleted span goes to the layer before
  it, as in ShortGPT.

The first `protect_first` original layers (default 1: layer 0, which reads the
embeddings and is typically the most influential layer) are
never merged or deleted, so no budget can force them into a merge.

With `refit` on (the default) each candidate is refitted before it is scored:
the layer that stands for the changed span gets the closed-form down_proj of
`core/refit.py`. A candidate's score is the calibration loss (next-token
cross-entropy on the first `search_samples` sequences) of the model with it in
place, run from the boundary cache at the changed position only. With
`search_finalists` N > 0 (the default), every candidate is first scored on the
first `search_finalist_samples` of those sequences, and only the N lowest go
on to the rest (a screen: the pick is unchanged whenever the winner over all
sequences is among them). The lowest loss wins (ties: the earlier candidate in
the order above), so at every step the chosen operation's loss is no higher
than that of the best deletion finalist. Every candidate's loss (or screen
loss) is in the plan's steps. With `search_autocast` (auto: where the device
computes bfloat16 natively) the loss passes run under bfloat16 autocast: the
ranking only, since the candidates themselves are built from the merges, the
refit statistics and the boundaries (whose layer passes `autocast` sets).
"""

from __future__ import annotations

from contextlib import nullcontext

from tqdm.auto import tqdm

from ..core.scoring import mean_loss
from ..errors import MergeError
from .come import bi_ratios, merge_with_ratios
from .come_p import candidate_ratios
from .sleb import removal_losses


def ratio_vectors(bi, start: int, size: int, shares) -> list[tuple[str, list[float]]]:
    """(name, ratios) of a window: the BI ratio first, then each first-layer share; duplicates dropped."""
    out = [("bi", bi_ratios(bi, start, size))]
    for r in shares:
        ratios = candidate_ratios(bi, start, size, float(r))
        if not any(max(abs(a - b) for a, b in zip(ratios, seen)) < 1e-9 for _, seen in out):
            out.append((f"r={float(r):g}", ratios))
    return out


def merge_candidates(ctx, size: int, bi, sbi) -> list[int]:
    """Starts of the `search_windows` windows of lowest distance (ties: the lower start)."""
    eligible = [i for i in range(len(sbi)) if ctx.window_eligible(i, size)]
    return sorted(eligible, key=lambda i: (sbi[i].item(), i))[: max(0, int(ctx.options.search_windows))]


def skip_errors(ctx) -> list[float]:
    """Every layer's skip error: the distance to the original model at the end of its span if it is skipped."""
    return [ctx.cache.skip_error(k, ctx.records[k]["covers"][-1] + 1) for k in range(ctx.num_layers)]


def screen_losses(ctx) -> dict[int, float]:
    """SLEB's score of every unprotected layer k: the calibration loss with k skipped and nothing refitted,
    on the first `search_screen_samples` sequences (a cheap screen: (L - k) layers on a few sequences)."""
    eligible = [k for k in range(ctx.num_layers) if not ctx.protected(k)]
    return dict(zip(eligible, removal_losses(ctx, eligible, samples=ctx.options.search_screen_samples)))


def deletion_candidates(ctx, bi, errors, screen: dict[int, float] | None = None) -> list[int]:
    """The `search_deletions` unprotected layers ranked first (ties: the lower index) by skip error, by
    block influence (`search_deletion_rank=bi`), by the screen's loss (`loss`), or taken in turn from
    the skip-error and the screen rankings (`error+loss`).

    Block influence compares a layer's input with its output on the *current* model, so it misses
    what earlier steps did: once a layer has absorbed a span (and been refitted), deleting its
    neighbour into it can be cheap although the neighbour's BI is high; skip error compares with the
    original model instead, so it ranks the deletions the loss prefers higher (bench/results/README.md).
    """
    eligible = [k for k in range(len(bi)) if not ctx.protected(k)]
    count, rank = max(0, int(ctx.options.search_deletions)), ctx.options.search_deletion_rank

    def by(score) -> list[int]:
        return sorted(eligible, key=lambda k: (score[k], k))

    if rank in ("error", "bi"):
        return by(errors if rank == "error" else bi.tolist())[:count]
    if rank == "loss":
        return by(screen)[:count]
    chosen: list[int] = []
    for pair in zip(by(errors), by(screen)):
        for k in pair:
            if len(chosen) < count and k not in chosen:
                chosen.append(k)
    return chosen


def score_candidates(cache, candidates, samples: int | None, finalists: int, screen_samples: int,
                     precision=nullcontext) -> None:
    """Set each candidate entry's "loss": the calibration loss on the first `samples` sequences of the
    model with the candidate in place (its "pass": where the changed part starts, and the stack run
    from there), each pass inside a `precision()` context (bfloat16 autocast, or nothing).

    With `finalists` N > 0 (and more than N candidates), every candidate is first scored
    on the first `screen_samples` sequences (recorded as "screen_loss"); only the N lowest (ties: the
    earlier) go on to the rest, so only they get a loss. A finalist's loss is the sum over both parts,
    which is the float one pass gives when `screen_samples` is a multiple of the batch size: the
    screen changes a pick only when the whole-sample winner is not among the screen's N best.
    """
    total = cache.tokens.shape[0] if samples is None else min(samples, cache.tokens.shape[0])

    def loss_sum(first, stack, **kwargs):
        with precision():
            return cache.loss_sum_through(first, stack, **kwargs)

    if not finalists or finalists >= len(candidates) or screen_samples >= total:
        for c in candidates:
            c["entry"]["loss"] = mean_loss(loss_sum(*c["pass"], samples=total))
        return
    screens = [loss_sum(*c["pass"], samples=screen_samples) for c in candidates]
    for c, part in zip(candidates, screens):
        c["entry"]["screen_loss"] = mean_loss(part)
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i]["entry"]["screen_loss"], i))
    for i in sorted(order[:finalists]):
        first, stack = candidates[i]["pass"]
        rest = loss_sum(first, stack, samples=total, skip=screen_samples)
        candidates[i]["entry"]["loss"] = mean_loss((screens[i][0] + rest[0], screens[i][1] + rest[1]))


class _Memo:
    """Candidate layers (and channel sensitivities) kept between steps while still valid.

    A candidate built from layers that all lie before the part of the model an operation
    changed sees the same layers, the same input boundary and the same teacher target, so the
    merged or refitted layer would come out the same: only its loss (which depends on the
    layers after it) is computed again. Entries are keyed by the original layers involved and
    dropped once an operation changes anything from their first original layer on.
    """

    def __init__(self):
        self.entries: dict = {}

    def get(self, key, build):
        if key not in self.entries:
            self.entries[key] = build()
        return self.entries[key]

    def changed_from(self, original_layer: int) -> None:
        self.entries = {k: v for k, v in self.entries.items() if k[-1] < original_layer}


def _window_key(ctx, kind: str, positions, extra=()) -> tuple:
    covers = tuple(tuple(ctx.records[k]["covers"]) for k in positions)
    return (kind, covers, *extra, max(c for cov in covers for c in cov))


def loss_precision(ctx):
    """The context factory of the candidate losses (`search_autocast`), noted in the plan's execution record."""
    return ctx.autocast(ctx.options.search_autocast, "search_loss_precision")


def search_step(ctx, size: int, memo: _Memo | None = None, precision=None) -> dict:
    """Score every candidate, apply the best; returns the step record."""
    cache, opts = ctx.cache, ctx.options
    precision = precision if precision is not None else loss_precision(ctx)
    memo = memo if memo is not None else _Memo()
    samples = opts.search_samples
    bi = cache.block_influence()
    sbi = cache.window_distance(size, all_tokens=opts.sbi_tokens == "all")
    errors = skip_errors(ctx)
    screen = screen_losses(ctx) if opts.search_deletion_rank in ("loss", "error+loss") else None
    scored, candidates = [], []

    # Merges.
    for start in merge_candidates(ctx, size, bi, sbi):
        window = range(start, start + size)
        sensitivities = {k: memo.get(_window_key(ctx, "sensitivity", [k]), lambda k=k: cache.channel_sensitivity(k))
                         for k in window}
        covers = [c for k in window for c in ctx.records[k]["covers"]]
        for name, ratios in ratio_vectors(bi, start, size, opts.search_ratios):
            def build(ratios=ratios, start=start, sensitivities=sensitivities, covers=covers):
                merged, record = merge_with_ratios(ctx, start, size, ratios, sensitivities)
                refit = None
                if opts.refit:
                    kwargs = cache.layer_kwargs[start + record["position"]]
                    merged, refit = ctx.refit_candidate(start, merged, covers=covers, kwargs=kwargs)
                return merged, record, refit

            key = _window_key(ctx, "merge", window, (name, tuple(round(r, 9) for r in ratios), opts.refit))
            merged, record, refit = memo.get(key, build)
            stack = [(merged, cache.layer_kwargs[start + record["position"]])] + cache.current_stack(start + size)
            entry = {"op": "merge", "window": [start, start + size - 1], "covers": covers, "ratios": name,
                     "ratio_values": [round(r, 6) for r in ratios], "loss": None}
            if refit is not None:
                entry["refit_error"] = [refit["error_before"], refit["error_after"]]
            scored.append(entry)
            candidates.append({"entry": entry, "layer": merged, "record": record, "refit": refit, "start": start,
                               "pass": (start, stack)})

    # Deletions: the span of layer k goes to the layer before it (after it, for layer 0).
    for k in deletion_candidates(ctx, bi, errors, screen):
        if ctx.num_layers < 2:
            break
        owner = k - 1 if k > 0 else 1
        covers = sorted(ctx.records[owner]["covers"] + ctx.records[k]["covers"])
        refit, layer = None, None
        if opts.refit:
            first = min(owner, k)  # where the changed part of the model starts: the refitted owner
            layer, refit = memo.get(
                _window_key(ctx, "delete", sorted([owner, k])),
                lambda first=first, owner=owner, covers=covers: ctx.refit_candidate(
                    first, ctx.layers[owner], covers=covers, kwargs=cache.layer_kwargs[owner]),
            )
            stack = [(layer, cache.layer_kwargs[owner])] + cache.current_stack(max(owner, k) + 1)
        else:  # as SLEB: h_k fed to the layers after k
            stack, first = cache.current_stack(k + 1), k
        entry = {"op": "delete", "layer": k, "covers": list(ctx.records[k]["covers"]), "owner_covers": covers,
                 "bi": round(bi[k].item(), 6),
                 "skip_error": round(errors[k], 6), "loss": None}
        if refit is not None:
            entry["refit_error"] = [refit["error_before"], refit["error_after"]]
        scored.append(entry)
        candidates.append({"entry": entry, "layer": layer, "refit": refit, "delete": k, "pass": (first, stack)})

    if not candidates:
        raise MergeError(
            f"come-search has no candidate at {ctx.num_layers} layers: raise --search-windows or --search-deletions"
        )
    score_candidates(cache, candidates, samples, opts.search_finalists, opts.search_finalist_samples, precision)
    # The lowest loss; ties go to the earlier candidate (merges by window distance, then deletions by BI).
    # A candidate the screen left out has no loss and is never chosen.
    finalists = [(i, c) for i, c in enumerate(candidates) if c["entry"]["loss"] is not None]
    chosen = min(finalists, key=lambda item: (item[1]["entry"]["loss"], item[0]))[1]
    step = {
        "step": len(ctx.steps),
        "layers_before": ctx.num_layers,
        "bi": [round(v, 6) for v in bi.tolist()],
        "sbi": [round(v, 6) for v in sbi.tolist()],
        "skip_error": [round(v, 6) for v in errors],
        **({"screen_loss": {k: round(v, 6) for k, v in screen.items()}} if screen is not None else {}),
        "candidates": scored,
        "chosen": chosen["entry"],
        "best_deletion_loss": min((c["loss"] for c in scored if c["op"] == "delete" and c["loss"] is not None),
                                  default=None),
    }
    ctx.steps.append(step)
    if "delete" in chosen:
        k = chosen["delete"]
        first = k - 1 if (chosen["refit"] is not None and k > 0) else k  # the refitted owner, or k itself
        memo.changed_from(ctx.records[first]["covers"][0])
        refitted = None
        if chosen["refit"] is not None:
            refitted = {max(0, k - 1): (chosen["layer"], chosen["refit"])}
        ctx.remove_layers([k], refitted=refitted)
    else:
        memo.changed_from(ctx.records[chosen["start"]]["covers"][0])
        ctx.merge_window(chosen["start"], chosen["layer"], size, {**chosen["record"], "rule": "come-search",
                         "ratios": chosen["entry"]["ratios"]}, refit=chosen["refit"])
    return step


def run(ctx, target_layers: int) -> None:
    total = ctx.num_layers - target_layers
    memo, precision = _Memo(), loss_precision(ctx)
    with tqdm(total=total, desc="merge-or-drop search", unit="layer", disable=not ctx.options.progress) as bar:
        while ctx.num_layers > target_layers:
            size = min(ctx.options.merge_size, ctx.num_layers - target_layers + 1)
            before = ctx.num_layers
            search_step(ctx, size, memo, precision)
            bar.update(before - ctx.num_layers)
