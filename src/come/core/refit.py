"""Closed-form output refit: make a layer reproduce the original model over the span it stands for.

After a merge or a deletion, one current layer k stands for original layers
a..b. Its input is the *current* model's hidden state h_k (earlier layers may
already be compressed), and what it should produce is the *original* model's
hidden state leaving layer b. For a Llama-style layer

    out = r + z W^T        r: the residual after attention, z: the FFN's inner activations,
                           W: down_proj (d_hidden x d_ffn)

so with r and z fixed, choosing W is linear least squares with target
Y = teacher - r. We solve the ridge problem that pulls W toward its current
value W0 (a large damping leaves the layer unchanged):

    min_W ||z W^T - Y||^2 + lam ||W - W0||^2   =>   (Z^T Z + lam I) W^T = Z^T Y + lam W0^T

Z^T Z (d_ffn^2) and Z^T Y (d_ffn x d_hidden) are accumulated over calibration
batches in float64 sums, so memory never depends on the token count. The damping is
chosen per layer on held-out calibration sequences (every `HOLDOUT_EVERY`-th
one) from a grid scaled to the mean diagonal of Z^T Z, then the system is
solved again on every sequence; the fit error of any W follows from the same
statistics, so the grid costs a few solves and no extra layer pass. A refit
that does not lower the held-out error leaves the layer as it was.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Self

import torch
from torch import nn

from ..errors import ComeError
from .scoring import all_finite, layer_output

# Damping grid, relative to the mean diagonal of Z^T Z; "auto" and "grid" pick from it on held-out sequences.
DAMPING_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
HOLDOUT_EVERY = 4  # sequence i is held out when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


@dataclass
class RidgeStats:
    """Sufficient statistics of a least-squares problem y ~ x W^T, accumulated in float64."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: float = 0.0  # sum ||y||^2
    tty: float = 0.0  # sum ||teacher||^2, to report errors relative to the target's size
    rows: int = 0

    @classmethod
    def zeros(cls, d_in: int, d_out: int, device="cpu") -> RidgeStats:
        return cls(torch.zeros(d_in, d_in, dtype=torch.float64, device=device),
                   torch.zeros(d_in, d_out, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None = None) -> None:
        """Add rows x -> y. Each batch's products are formed in float32 at least (float64 inputs stay
        float64) and added to the float64 sums: a batch of a few thousand rows loses ~1e-6 relative,
        far below any damping used, at half the cost of float64 products on CPUs."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, dtype)
        y = y.reshape(-1, y.shape[-1]).to(self.xtx.device, dtype)
        self.xtx += _gram(x)  # promoted to float64 in the add: the same sums as adding a float64 copy
        self.xty += x.T @ y
        self.yty += float(y.double().pow(2).sum())
        if teacher is not None:
            self.tty += float(teacher.double().pow(2).sum())
        self.rows += x.shape[0]

    def __iadd__(self, other: RidgeStats) -> Self:
        self.xtx += other.xtx
        self.xty += other.xty
        self.yty += other.yty
        self.tty += other.tty
        self.rows += other.rows
        return self

    def error(self, w: torch.Tensor) -> float:
        """sum ||x W^T - y||^2 over the accumulated rows, from the statistics alone."""
        wt = w.to(self.xtx.device, torch.float64).T  # d_in x d_out
        return float((wt * (self.xtx @ wt)).sum() - 2 * (wt * self.xty).sum() + self.yty)

    def relative_error(self, w: torch.Tensor) -> float:
        """Squared error relative to the squared norm of the teacher states."""
        return self.error(w) / max(self.tty, 1e-30)


class _Rows:
    """Rows for a `RidgeStats`, added to it in blocks of at least d_in rows: each block's float32 Gram
    matrix is converted to float64 and summed once, which at a wide FFN costs as much memory traffic as
    a batch's product, so a block of fewer rows would spend most of its time there."""

    def __init__(self, stats: RidgeStats):
        self.stats, self.parts, self.rows = stats, [], 0

    def add(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor) -> None:
        x, y, teacher = (t.reshape(-1, t.shape[-1]) for t in (x, y, teacher))
        self.parts.append((x, y, teacher))
        self.rows += x.shape[0]
        if self.rows >= self.stats.xtx.shape[0]:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.stats.add(*(torch.cat(column) for column in zip(*self.parts)))
            self.parts, self.rows = [], 0


def _gram(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """x^T x from its blocks on and right of the diagonal, mirrored: a wide FFN's Gram matrix in about
    half the products of one matmul. Each entry is the same dot product over the rows as in x.T @ x."""
    n = x.shape[1]
    count = min(8, n // block)
    if count < 2:
        return x.T @ x
    edges = [round(i * n / count) for i in range(count + 1)]
    out = x.new_empty(n, n)
    for a, b in pairwise(edges):
        strip = x[:, a:b].T @ x[:, a:]  # rows a..b-1, columns a..n-1
        out[a:b, a:] = strip
        out[b:, a:b] = strip[:, b - a :].T
    return out


def ridge_solve(stats: RidgeStats, damping: float, w0: torch.Tensor | None = None) -> torch.Tensor:
    """W (d_out x d_in) minimising ||x W^T - y||^2 + lam ||W - W0||^2, lam = damping * mean diag(X^T X)."""
    lam = float(damping) * _scale(stats)
    b = stats.xty.clone()
    if w0 is not None and lam > 0:
        b += lam * w0.to(b.device, torch.float64).T
    return _solve_shifted(stats.xtx, lam, b).T.contiguous()


def ridge_solution_error(stats: RidgeStats, damping: float, w: torch.Tensor, w0: torch.Tensor) -> float:
    """`stats.error(W)` of the solution W of `ridge_solve(stats, damping, w0)`, without `error`'s
    d_in^2 x d_out product: the solution has X^T X W^T = X^T Y + lam (W0^T - W^T), so the error
    <W^T, X^T X W^T> - 2 <W^T, X^T Y> + y^T y is lam <W^T, W0^T - W^T> - <W^T, X^T Y> + y^T y."""
    lam = float(damping) * _scale(stats)
    wt = w.to(stats.xty.device, torch.float64).T
    w0t = w0.to(stats.xty.device, torch.float64).T
    return max(0.0, float(lam * (wt * (w0t - wt)).sum() - (wt * stats.xty).sum() + stats.yty))


def _solve_shifted(xtx: torch.Tensor, lam: float, b: torch.Tensor, work: torch.Tensor | None = None,
                   fallback: bool = True) -> torch.Tensor | None:
    """(X^T X + lam I)^-1 b by Cholesky; a system singular without damping gets the minimum-norm solution
    (with `fallback` off: None). `work` (the shape of xtx), if given, is overwritten instead of allocating a
    d_in^2 copy per call."""
    a = xtx.clone() if work is None else work.copy_(xtx)
    a.diagonal().add_(lam)  # the same values as xtx + lam * I, without a d_in^2 identity
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    return torch.linalg.lstsq(a, b).solution if fallback else None


def _scale(stats: RidgeStats) -> float:
    return float(stats.xtx.diagonal().mean().clamp_min(1e-12))


def ridge_path(stats: RidgeStats, dampings, w0: torch.Tensor) -> dict:
    """{damping: W} for several dampings from one eigendecomposition of X^T X (one solve each costs a matmul)."""
    evals, q = torch.linalg.eigh(stats.xtx)
    w0t = w0.to(q.device, torch.float64).T
    qtb, qtw = q.T @ stats.xty, q.T @ w0t
    scale = _scale(stats)
    out = {}
    for d in dampings:
        lam = float(d) * scale
        out[d] = (q @ ((qtb + lam * qtw) / (evals.clamp_min(0) + lam)[:, None])).T.contiguous()
    return out


def _error_with(stats: RidgeStats, wt: torch.Tensor, xtx_wt: torch.Tensor) -> float:
    """`stats.error` of W = wt^T, given the product X^T X wt."""
    return float((wt * xtx_wt).sum() - 2 * (wt * stats.xty).sum() + stats.yty)


def held_out_path(fit: RidgeStats, held_out: RidgeStats, w0: torch.Tensor, dampings) -> dict:
    """{damping: held-out error of the solution fitted on `fit`}, without forming any solution.

    The solution is W0 + D with (X^T X + lam I) D^T = X^T Y - X^T X W0^T, so its held-out error is
    error(W0) + 2 <D^T, H W0^T - C> + <D^T, H D^T> (H, C: the held-out X^T X, X^T Y): one Cholesky
    solve and one product per damping. `ridge_path` serves every damping from one eigendecomposition
    instead, but a float64 eigh of a wide FFN's Z^T Z costs more than all the grid's factorisations,
    and forming each W costs another product.
    """
    w0t = w0.to(fit.xtx.device, torch.float64).T
    held_w0 = held_out.xtx @ w0t
    return _HeldOutPath(fit, held_out, w0t, fit.xtx @ w0t, held_w0, _error_with(held_out, w0t, held_w0)).scores(dampings)


class _HeldOutPath:
    """damping -> held-out error of the solution fitted on `fit` (see `held_out_path`), one solve per call.

    `dtype` float32 factors and solves in float32 (about twice as fast on CPUs); the error's terms are
    summed in float64 either way. `choose_and_solve` uses it only to screen the damping walk.
    """

    def __init__(self, fit, held_out, w0t, fit_w0, held_w0, held_error0, dtype=torch.float64):
        self.held_error0 = held_error0
        self.r, self.g = (fit.xty - fit_w0).to(dtype), held_w0 - held_out.xty
        self.xtx, self.held_xtx = fit.xtx.to(dtype), held_out.xtx.to(dtype)
        self.scale, self.work = _scale(fit), torch.empty_like(self.xtx)

    def __call__(self, damping: float) -> float:
        # The screen's failed factorisation scores NaN, so float64 decides; float64 falls back to lstsq.
        delta = _solve_shifted(self.xtx, float(damping) * self.scale, self.r, self.work,
                               fallback=self.xtx.dtype == torch.float64)
        if delta is None:
            return math.nan
        h_delta = (self.held_xtx @ delta).double()
        delta = delta.double()
        return self.held_error0 + float(2 * (delta * self.g).sum() + (delta * h_delta).sum())

    def scores(self, dampings) -> dict:
        return {d: self(d) for d in dampings}


# The float32 screen of the damping walk decides only when every two held-out errors it scored, and the
# unchanged layer's, differ by more than this fraction of the larger of them and of the unchanged layer's
# error (the size of the terms the errors are sums of): far above the float32 solve's error on real refits
# (bench/results/README.md), so it picks what float64 picks; otherwise float64 walks and decides.
SCREEN_MARGIN = 1e-4
SCREEN_DTYPE: torch.dtype | None = torch.float32  # None: no screen, float64 walks (bench/refit_cost.py compares)


def _separated(values, scale: float) -> bool:
    """Every two values more than SCREEN_MARGIN x (the larger, or `scale`) apart; a NaN is never separated."""
    if any(math.isnan(v) for v in values):
        return False
    values = sorted(values)
    return all(b - a > SCREEN_MARGIN * max(abs(a), abs(b), abs(scale)) for a, b in pairwise(values))


def lowest_on_grid(score, grid, start: int | None = None) -> tuple[float, dict]:
    """(the grid value of lowest score, {value: score} of the values scored), ties to the larger value.

    Walks from `start` (default: the middle) one grid step at a time toward lower scores and stops
    where the next is higher, so it scores about a third of a 9-value grid. That is the grid's
    minimum whenever the score falls then rises along the grid (unimodal), which the held-out error of
    a ridge path does in every refit recorded in the bench results; `refit_damping="grid"` scores
    every value instead.
    """
    n = len(grid)
    scores: dict = {}

    def key(i):
        if grid[i] not in scores:
            scores[grid[i]] = score(grid[i])
        return (scores[grid[i]], -grid[i])

    best = first = n // 2 if start is None else start
    for step in (1, -1):
        i = best + step
        while 0 <= i < n and key(i) < key(best):
            best, i = i, i + step
        if best != first:  # it fell this way, so it rises the other way
            break
    return grid[best], scores


@dataclass
class RefitResult:
    weight: torch.Tensor  # the chosen down_proj weight (float64)
    record: dict = field(default_factory=dict)


FALLBACK_DAMPING = 0.1  # "auto" with no held-out sequence (fewer than HOLDOUT_EVERY calibration sequences)


def choose_and_solve(fit: RidgeStats, held_out: RidgeStats, w0: torch.Tensor, damping,
                     start: float | None = None) -> RefitResult:
    """Solve with `damping` (a number) or the grid value with the lowest held-out error: "grid" scores every
    grid value, "auto" walks the grid to its lowest (`lowest_on_grid`), from the grid value `start` if one
    is given (neighbouring refits tend to choose alike, so the damping the last one chose costs the walk
    fewer solves than the middle; the choice is the same whenever the held-out error is unimodal).

    The held-out error of a damping is that of the solution fitted without the held-out rows; the
    weight returned is then solved on every row. With "auto" or "grid", a refit whose best held-out
    error is no lower than the unchanged layer's is not applied.
    """
    total = RidgeStats(fit.xtx.clone(), fit.xty.clone(), fit.yty, fit.tty, fit.rows)
    total += held_out
    has_held = held_out.rows > 0 and fit.rows > 0
    # X^T X W0^T of both parts, formed once: the errors of W0 and the grid's right-hand side use them.
    w0t = w0.to(fit.xtx.device, torch.float64).T
    fit_w0, held_w0 = fit.xtx @ w0t, held_out.xtx @ w0t
    held_error0 = _error_with(held_out, w0t, held_w0)
    before = {"calibration": (_error_with(fit, w0t, fit_w0) + held_error0) / max(total.tty, 1e-30)}
    if has_held:
        before["held_out"] = held_error0 / max(held_out.tty, 1e-30)
    record: dict = {"target": "down_proj", "rows": total.rows, "held_out_rows": held_out.rows, "error_before": before}
    after: dict = {}
    if damping in ("auto", "grid") and not has_held:
        damping_value = FALLBACK_DAMPING
        record["note"] = f"no held-out sequence: damping {FALLBACK_DAMPING} used"
    elif damping in ("auto", "grid"):
        path = _HeldOutPath(fit, held_out, w0t, fit_w0, held_w0, held_error0)
        if damping == "grid":
            scores = path.scores(DAMPING_GRID)
            damping_value = min(DAMPING_GRID, key=lambda d: (scores[d], -d))  # ties: the stronger damping
        else:
            first = DAMPING_GRID.index(start) if start in DAMPING_GRID else None
            # Walk in float32; keep its choice only if no comparison it made (nor the one against the
            # unchanged layer) was close enough for float32's error to have decided it.
            separated = False
            if SCREEN_DTYPE is not None:
                screen = _HeldOutPath(fit, held_out, w0t, fit_w0, held_w0, held_error0, SCREEN_DTYPE)
                damping_value, scores = lowest_on_grid(screen, DAMPING_GRID, first)
                separated = _separated([*scores.values(), held_error0], held_error0)
            if not separated:
                damping_value, scores = lowest_on_grid(path, DAMPING_GRID, first)
        record["held_out_errors"] = {f"{d:g}": scores[d] / max(held_out.tty, 1e-30) for d in DAMPING_GRID if d in scores}
        after["held_out"] = scores[damping_value] / max(held_out.tty, 1e-30)
        if scores[damping_value] >= held_error0:  # the refit would not generalise: keep the layer
            record.update(damping=None, applied=False, error_after=before)
            return RefitResult(w0.double(), record)
    else:
        damping_value = float(damping)
        if has_held:
            after["held_out"] = held_out.relative_error(ridge_solve(fit, damping_value, w0))
    weight = ridge_solve(total, damping_value, w0)
    after = {"calibration": ridge_solution_error(total, damping_value, weight, w0) / max(total.tty, 1e-30), **after}
    record.update(damping=damping_value, applied=True, error_after=after)
    return RefitResult(weight, record)


def parse_damping(value) -> str | float:
    if value in (None, "auto", "grid"):
        return value or "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ComeError(f"refit damping must be 'auto', 'grid' or a number >= 0, got {value!r}") from None
    if not number >= 0:
        raise ComeError(f"refit damping must be 'auto', 'grid' or a number >= 0, got {value!r}")
    return number


@torch.no_grad()
def collect_stats(cache, k: int, layer: nn.Module, kwargs: dict, target_index: int, adapter):
    """(fit, held-out) statistics of `layer` run on boundary h_k, with the teacher's boundary `target_index`.

    Boundary h_k must be current (the caller guarantees layers before k are final). When the FFN
    output passes a norm before the residual add (Gemma), out = r + g * m / rms(m) is not linear in W;
    the statistics then linearise it with each token's rms(m) held at its current value.
    """
    down = adapter.down_proj(layer)
    added = adapter.ffn_output(layer)  # the module whose output the FFN adds to the residual
    normed = added is not down
    captured: dict = {}
    handles = [down.register_forward_hook(lambda mod, args, out: captured.update(z=args[0], m=out)),
               added.register_forward_hook(lambda mod, args, out: captured.update(added=out))]
    d_in, d_out = down.weight.shape[1], down.weight.shape[0]
    fit = RidgeStats.zeros(d_in, d_out, cache.device)
    held = RidgeStats.zeros(d_in, d_out, cache.device)
    fit_rows_of, held_rows_of = _Rows(fit), _Rows(held)
    teacher = cache.teacher_boundary(target_index)
    if normed:
        # A channel of gain 0 (Gemma-3-270M has some) outputs nothing whatever W is: its target is its
        # current value, so its row of W stays W0 instead of dividing by 0.
        gain = adapter.norm_offset + added.weight.float()
        dead = gain.abs() <= 1e-6 * gain.abs().max()
        safe_gain = torch.where(dead, torch.ones_like(gain), gain)
    inputs = cache.boundary(k)
    try:
        for b0, b1 in cache.batches():
            x = inputs[b0:b1].to(cache.device, cache.compute_dtype)
            with cache.layer_precision():  # the layer pass only: the statistics are summed as below in any case
                out = layer(x, **kwargs)
            out = layer_output(out)
            cache.count_passes(b1 - b0)
            t = teacher[b0:b1].to(cache.device, torch.float32)
            residual = out.float() - captured["added"].float()  # r: everything but the FFN's contribution
            y = t - residual
            if normed:  # g * (z W^T) / rho = y  <=>  z W^T = y * rho / g, rho frozen
                m = captured["m"].float()
                rho = m.pow(2).mean(-1, keepdim=True).add(added.eps).sqrt()
                y = torch.where(dead, m, y * rho / safe_gain)
            elif down.bias is not None:
                y = y - down.bias.float()
            z = captured["z"]
            held_rows = [i for i in range(b1 - b0) if (b0 + i) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
            fit_rows = [i for i in range(b1 - b0) if (b0 + i) % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
            for rows_of, rows in ((fit_rows_of, fit_rows), (held_rows_of, held_rows)):
                if rows:
                    rows_of.add(z[rows], y[rows], t[rows])
        fit_rows_of.flush()
        held_rows_of.flush()
    finally:
        for handle in handles:
            handle.remove()
    return fit, held


@torch.no_grad()
def held_out_span_error(cache, k: int, layer: nn.Module, kwargs: dict, target_index: int) -> float:
    """Relative error of `layer`'s real output against the teacher on the held-out sequences."""
    teacher, inputs, num, den = cache.teacher_boundary(target_index), cache.boundary(k), 0.0, 0.0
    for b0, b1 in cache.batches():
        rows = [i for i in range(b1 - b0) if (b0 + i) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
        if not rows:
            continue
        x = inputs[b0:b1][rows].to(cache.device, cache.compute_dtype)
        with cache.layer_precision():
            out = layer(x, **kwargs)
        out = layer_output(out).double()
        t = teacher[b0:b1][rows].to(out.device, torch.float64)
        num += float((out - t).pow(2).sum())
        den += float(t.pow(2).sum())
        cache.count_passes(len(rows))
    return num / max(den, 1e-30)


def refit_layer(cache, k: int, layer: nn.Module, kwargs: dict, target_index: int, adapter, damping,
                start: float | None = None) -> tuple[nn.Module, dict]:
    """A copy of `layer` (standing at position k) whose down_proj is refitted to the teacher's boundary
    `target_index`; the record holds the chosen damping and the relative fit errors before and after.
    `start`: where the damping walk begins (`choose_and_solve`)."""
    fit, held = collect_stats(cache, k, layer, kwargs, target_index, adapter)
    down = adapter.down_proj(layer)
    if not all(all_finite(t) for t in (fit.xtx, fit.xty, held.xtx, held.xty)):
        # The layer's own output overflows on these inputs: nothing to fit, keep it as it is.
        return layer, {"target": "down_proj", "applied": False, "note": "non-finite activations: not refitted",
                       "error_before": {"calibration": float("nan")}, "error_after": {"calibration": float("nan")}}
    result = choose_and_solve(fit, held, down.weight.detach(), parse_damping(damping), start)
    new_layer = copy.deepcopy(layer)
    new_down = adapter.down_proj(new_layer)
    new_down.weight.data = result.weight.to(down.weight.device, down.weight.dtype)
    record = result.record
    if adapter.ffn_output(layer) is not down and record["applied"] and held.rows:
        # The fit was linearised around the current rms: keep it only if the real output is closer.
        real = (held_out_span_error(cache, k, layer, kwargs, target_index),
                held_out_span_error(cache, k, new_layer, kwargs, target_index))
        record["linearised"] = True
        record["held_out_real_error"] = list(real)
        if real[1] >= real[0]:
            record["applied"] = False
            return layer, record
    return new_layer, record
