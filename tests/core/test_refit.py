"""Closed-form output refit and the ReplaceMe baseline: exact algebra on tiny models."""

import copy

import pytest
import torch

from come.core.adapters import adapter_for
from come.core.refit import (
    DAMPING_GRID,
    HOLDOUT_EVERY,
    RidgeStats,
    choose_and_solve,
    collect_stats,
    held_out_path,
    lowest_on_grid,
    parse_damping,
    ridge_path,
    ridge_solution_error,
    ridge_solve,
)
from come.engine.models import LoadedModel
from come.engine.pipeline import CompressionContext, CompressionOptions, compress
from come.methods.replaceme import block_sizes, fold
from come.testing import tiny_model, tiny_tokens

TOKENS = tiny_tokens(nsamples=8, seqlen=32)


def _stats(x, y):
    stats = RidgeStats.zeros(x.shape[1], y.shape[1])
    stats.add(x, y, y)
    return stats


def test_ridge_solution_equals_lstsq_of_the_augmented_system():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 12, generator=g, dtype=torch.float64), torch.randn(200, 5, generator=g, dtype=torch.float64)
    w0 = torch.randn(5, 12, generator=g, dtype=torch.float64)
    stats = _stats(x, y)
    # No damping: ordinary least squares.
    torch.testing.assert_close(ridge_solve(stats, 0.0), torch.linalg.lstsq(x, y).solution.T)
    # Damping pulls toward W0: min ||x W^T - y||^2 + lam ||W - W0||^2 is lstsq of [x; sqrt(lam) I] W^T = [y; sqrt(lam) W0^T].
    lam = 0.3 * stats.xtx.diagonal().mean()
    xa = torch.cat([x, lam.sqrt() * torch.eye(12, dtype=torch.float64)])
    ya = torch.cat([y, lam.sqrt() * w0.T])
    expected = torch.linalg.lstsq(xa, ya).solution.T
    torch.testing.assert_close(ridge_solve(stats, 0.3, w0), expected)
    # The eigendecomposition path gives the same solutions for every damping of the grid.
    for d, w in ridge_path(stats, DAMPING_GRID, w0).items():
        torch.testing.assert_close(w, ridge_solve(stats, d, w0), rtol=1e-7, atol=1e-9)
    # The error computed from the statistics is the error.
    w = ridge_solve(stats, 0.3, w0)
    assert stats.error(w) == pytest.approx(float(((x @ w.T - y) ** 2).sum()), rel=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_streaming_accumulation_equals_all_at_once(dtype, tol):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 16, generator=g, dtype=dtype), torch.randn(300, 7, generator=g, dtype=dtype)
    once = _stats(x, y)
    streamed = RidgeStats.zeros(16, 7)
    for rows in torch.arange(300).split(37):
        streamed.add(x[rows], y[rows], y[rows])
    exact = x.double().T @ x.double()
    torch.testing.assert_close(streamed.xtx, exact, rtol=tol, atol=tol)
    torch.testing.assert_close(once.xtx, exact, rtol=tol, atol=tol)
    torch.testing.assert_close(streamed.xty, x.double().T @ y.double(), rtol=tol, atol=tol)
    assert streamed.rows == once.rows == 300 and streamed.yty == pytest.approx(once.yty)
    torch.testing.assert_close(ridge_solve(streamed, 0.01), ridge_solve(once, 0.01), rtol=10 * tol, atol=10 * tol)


def test_auto_damping_is_chosen_on_held_out_rows_and_never_hurts_them():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, 40, generator=g, dtype=torch.float64)  # few rows for 40 inputs: unregularised fits overfit
    w_true = torch.randn(3, 40, generator=g, dtype=torch.float64)
    y = x @ w_true.T + 2.0 * torch.randn(60, 3, generator=g, dtype=torch.float64)
    fit, held = _stats(x[:45], y[:45]), _stats(x[45:], y[45:])
    w0 = torch.zeros(3, 40, dtype=torch.float64)
    result = choose_and_solve(fit, held, w0, "auto")
    errors = {d: held.error(ridge_solve(fit, d, w0)) for d in DAMPING_GRID}
    best = min(DAMPING_GRID, key=lambda d: (errors[d], -d))
    assert result.record["damping"] == best and result.record["applied"]
    assert result.record["error_after"]["held_out"] < result.record["error_before"]["held_out"]
    # Held-out rows that contradict the fitted ones: every damping of the grid is worse on them than
    # the unchanged weight, so the refit is not applied and the weight stays W0.
    fit_rows, held_rows = _stats(x[:45], y[:45]), _stats(x[45:], -y[45:])
    kept = choose_and_solve(fit_rows, held_rows, w0, "auto")
    assert not kept.record["applied"] and kept.record["damping"] is None and torch.equal(kept.weight, w0)



def test_the_damping_walk_finds_the_grids_lowest_of_every_unimodal_score_from_every_start():
    """Every score that falls then rises along the grid (every position of the minimum, plateaus included):
    the walk picks what scoring the whole grid picks (ties to the larger damping), scoring fewer values."""
    grid = DAMPING_GRID
    n = len(grid)
    for low in range(n):
        for flat in (False, True):
            values = [float(abs(i - low)) for i in range(n)]
            if flat and low + 1 < n:
                values[low + 1] = values[low]  # a tie beside the minimum: the larger damping wins
            expected = min(grid, key=lambda d: (values[grid.index(d)], -d))
            for start in range(n):
                calls = []
                best, scores = lowest_on_grid(lambda d, calls=calls, values=values: calls.append(d) or values[grid.index(d)], grid, start)
                assert best == expected, (low, flat, start)
                assert len(calls) == len(set(calls)) == len(scores)  # each damping solved at most once
                assert all(scores[d] == values[grid.index(d)] for d in scores)
    # From the middle, a minimum at the middle or next to it costs three or four solves, not nine.
    mid = n // 2
    for low, most in ((mid, 3), (mid + 1, 3), (mid + 2, 4)):
        _, scores = lowest_on_grid(lambda d, low=low: abs(grid.index(d) - low), grid)
        assert len(scores) <= most


def test_grid_damping_scores_every_value_and_auto_walks():
    """refit_damping="grid" scores the whole grid (the choice behind a score with two dips); "auto" walks."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, 40, generator=g, dtype=torch.float64)
    y = x @ torch.randn(3, 40, generator=g, dtype=torch.float64).T + 2.0 * torch.randn(60, 3, generator=g, dtype=torch.float64)
    fit, held = _stats(x[:45], y[:45]), _stats(x[45:], y[45:])
    w0 = torch.zeros(3, 40, dtype=torch.float64)
    full, walked = choose_and_solve(fit, held, w0, "grid"), choose_and_solve(fit, held, w0, "auto")
    assert len(full.record["held_out_errors"]) == len(DAMPING_GRID) > len(walked.record["held_out_errors"])
    assert full.record["damping"] == walked.record["damping"]  # this score falls then rises
    torch.testing.assert_close(full.weight, walked.weight, rtol=0, atol=0)
    before = walked.record["error_before"]["held_out"]
    for key, value in walked.record["held_out_errors"].items():  # the walk's float32 screen
        assert value == pytest.approx(full.record["held_out_errors"][key], abs=1e-6 * before)
    assert parse_damping("grid") == "grid" and parse_damping(None) == "auto" and parse_damping("0.5") == 0.5
    with pytest.raises(Exception, match="'auto', 'grid' or a number"):
        parse_damping("fast")


def test_the_float32_screen_picks_what_float64_picks_and_defers_close_calls(monkeypatch):
    """"auto" walks the grid with float32 solves; where two of the errors it compares (or the chosen one
    and the unchanged layer's) are within SCREEN_MARGIN of each other, float64 walks again and decides."""
    from come.core import refit

    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 64, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 64, dtype=torch.float64)
    y = x @ torch.randn(64, 5, generator=g, dtype=torch.float64) + 10 * torch.randn(400, 5, generator=g, dtype=torch.float64)
    fit, held = _stats(x[:300], y[:300]), _stats(x[300:], y[300:])
    w0 = 0.1 * torch.randn(5, 64, generator=g, dtype=torch.float64)
    exact = held_out_path(fit, held, w0, DAMPING_GRID)
    best, walked = lowest_on_grid(lambda d: exact[d], DAMPING_GRID)
    screened = choose_and_solve(fit, held, w0, "auto")
    errors = screened.record["held_out_errors"]
    assert screened.record["damping"] == best and set(errors) == {f"{d:g}" for d in walked}
    # The screen decided (float32 values, not float64's), and the weight is float64's solve at its choice.
    tty = held.tty
    assert any(errors[f"{d:g}"] != exact[d] / tty for d in walked)
    before = screened.record["error_before"]["held_out"]
    assert all(errors[f"{d:g}"] == pytest.approx(exact[d] / tty, abs=1e-6 * before) for d in walked)
    torch.testing.assert_close(screened.weight, ridge_solve(_stats(x, y), best, w0), rtol=1e-10, atol=1e-12)
    # A float32 factorisation that fails scores NaN: float64 decides.
    real_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a: (a, torch.ones((), dtype=torch.int32))
                        if a.dtype == torch.float32 else real_ex(a))
    failed = choose_and_solve(fit, held, w0, "auto")
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real_ex)
    assert failed.record["held_out_errors"] == {f"{d:g}": exact[d] / tty for d in walked}
    torch.testing.assert_close(failed.weight, screened.weight, rtol=0, atol=0)
    # Every comparison "close": float64 walks and its values are recorded.
    monkeypatch.setattr(refit, "SCREEN_MARGIN", 10.0)
    deferred = choose_and_solve(fit, held, w0, "auto")
    assert deferred.record["damping"] == best
    assert deferred.record["held_out_errors"] == {f"{d:g}": exact[d] / tty for d in walked}
    torch.testing.assert_close(deferred.weight, screened.weight, rtol=0, atol=0)


def test_the_walk_from_any_start_chooses_and_solves_what_the_middle_start_does():
    """`start` only moves where "auto" begins walking: from every grid value the damping and the weight
    are those of the walk from the middle, and starting at the choice itself scores at most three values."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 32, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 32, dtype=torch.float64)
    y = x @ torch.randn(32, 4, generator=g, dtype=torch.float64) + 3 * torch.randn(300, 4, generator=g, dtype=torch.float64)
    fit, held = _stats(x[:225], y[:225]), _stats(x[225:], y[225:])
    w0 = 0.1 * torch.randn(4, 32, generator=g, dtype=torch.float64)
    middle = choose_and_solve(fit, held, w0, "auto")
    chosen = middle.record["damping"]
    for start in (*DAMPING_GRID, 0.5, None):  # 0.5 is off the grid: the middle
        walked = choose_and_solve(fit, held, w0, "auto", start=start)
        assert walked.record["damping"] == chosen, start
        torch.testing.assert_close(walked.weight, middle.weight, rtol=0, atol=0)
    assert len(choose_and_solve(fit, held, w0, "auto", start=chosen).record["held_out_errors"]) <= 3


def test_each_refit_walk_starts_where_the_previous_one_chose(monkeypatch):
    """The compression keeps the damping the latest walk chose and starts the next walk there: the same
    plan and weights as walks that all start from the middle."""
    from come.core import refit

    real, calls = refit.choose_and_solve, []

    def spy(fit, held, w0, damping, start=None):
        result = real(fit, held, w0, damping, start)
        walked = "held_out_errors" in result.record and result.record["damping"] is not None
        calls.append((start, result.record["damping"] if walked else None))
        return result

    def run(solve):
        monkeypatch.setattr(refit, "choose_and_solve", solve)
        return compress(LoadedModel(tiny_model("qwen2", seed=2), None, {}), target_layers=5, tokens=TOKENS,
                        progress=False, search_samples=4, search_finalist_samples=1)

    hinted = run(spy)
    latest = None  # each walk starts at the latest choice before it (a refit that kept its layer chose none)
    for start, chose in calls:
        assert start == latest
        latest = chose if chose is not None else latest
    assert len(calls) > 2 and any(start is not None for start, _ in calls)
    middle = run(lambda fit, held, w0, damping, start=None: real(fit, held, w0, damping))
    dampings = [[layer.get("refit", {}).get("damping") for layer in r.plan["layers"]] for r in (hinted, middle)]
    assert dampings[0] == dampings[1]
    assert [s["chosen"] for s in hinted.plan["steps"]] == [s["chosen"] for s in middle.plan["steps"]]
    for a, b in zip(hinted.model.state_dict().values(), middle.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [300, 40])  # 40 rows < 48 inputs: a singular fit Z^T Z, only the damping makes it solvable
def test_the_damping_grid_and_the_final_solve_equal_a_plain_float64_solve(rows):
    """The grid is scored without forming any solution (one Cholesky solve per damping, the held-out
    error expanded around W0) and the Gram matrix is formed from blocks: each must equal the plain
    float64 solve (X^T X + lam I) W^T = X^T Y + lam W0^T and the errors of its solutions."""
    g = torch.Generator().manual_seed(5)
    d_in, d_out = 48, 6
    # Inputs of very different sizes, as FFN activations are: an ill-conditioned X^T X.
    x = torch.randn(rows, d_in, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, d_in, dtype=torch.float64)
    y = x @ torch.randn(d_in, d_out, generator=g, dtype=torch.float64) + 0.5 * torch.randn(rows, d_out, generator=g, dtype=torch.float64)
    w0 = 0.1 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    cut = rows * 3 // 4
    fit, held = _stats(x[:cut], y[:cut]), _stats(x[cut:], y[cut:])

    def reference(stats, damping):
        lam = damping * stats.xtx.diagonal().mean()
        eye = torch.eye(d_in, dtype=torch.float64)
        return torch.linalg.solve(stats.xtx + lam * eye, stats.xty + lam * w0.T).T

    def held_error(w):  # from the rows themselves, not from the statistics
        return float(((x[cut:] @ w.T - y[cut:]) ** 2).sum())

    scores = held_out_path(fit, held, w0, DAMPING_GRID)
    for d in DAMPING_GRID:
        torch.testing.assert_close(ridge_solve(fit, d, w0), reference(fit, d), rtol=1e-8, atol=1e-10)
        assert scores[d] == pytest.approx(held_error(reference(fit, d)), rel=1e-9)
    result = choose_and_solve(fit, held, w0, "auto")
    best = min(DAMPING_GRID, key=lambda d: (scores[d], -d))
    assert result.record["damping"] == best and result.record["applied"]
    total = _stats(x, y)
    torch.testing.assert_close(result.weight, reference(total, best), rtol=1e-8, atol=1e-10)
    assert result.record["error_after"]["calibration"] == pytest.approx(
        float(((x @ result.weight.T - y) ** 2).sum() / (y**2).sum()), rel=1e-9)
    assert result.record["error_before"]["calibration"] == pytest.approx(float(((x @ w0.T - y) ** 2).sum() / (y**2).sum()), rel=1e-9)


@pytest.mark.parametrize("rows", [300, 40])
def test_the_error_of_a_ridge_solution_from_its_normal_equations_equals_the_error_of_its_rows(rows):
    """`ridge_solution_error` reads the fit error of a solution off its normal equations instead of
    forming X^T X W^T: it must equal the error computed from the rows, for every damping (0 included,
    where a singular system takes the minimum-norm solution)."""
    g = torch.Generator().manual_seed(11)
    d_in, d_out = 48, 6
    x = torch.randn(rows, d_in, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, d_in, dtype=torch.float64)
    y = x @ torch.randn(d_in, d_out, generator=g, dtype=torch.float64) + 0.5 * torch.randn(rows, d_out, generator=g, dtype=torch.float64)
    w0 = 0.1 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    stats = _stats(x, y)
    for damping in (0.0, *DAMPING_GRID):
        w = ridge_solve(stats, damping, w0)
        from_rows = float(((x @ w.T - y) ** 2).sum())
        # An exact fit (40 rows, no damping) has error 0 up to the cancellation of terms of size y^T y.
        assert ridge_solution_error(stats, damping, w, w0) == pytest.approx(from_rows, rel=1e-9, abs=1e-12 * stats.yty), damping
        if damping > 0:  # not an identity: a weight that is not the solution gets another error
            assert ridge_solution_error(stats, damping, w0, w0) != pytest.approx(stats.error(w0), rel=1e-3)


def test_rows_reach_the_statistics_in_blocks_of_at_least_d_in_rows(monkeypatch):
    from come.core.refit import _Rows

    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(100, 16, generator=g), torch.randn(100, 3, generator=g)
    stats, calls = RidgeStats.zeros(16, 3), []
    real_add = RidgeStats.add
    monkeypatch.setattr(RidgeStats, "add", lambda self, *a: calls.append(a[0].shape[0]) or real_add(self, *a))
    rows = _Rows(stats)
    for b0 in range(0, 100, 6):  # batches of 6 rows: flushed at 18, 36, ... then the rest
        rows.add(x[b0 : b0 + 6].reshape(-1, 2, 16), y[b0 : b0 + 6].reshape(-1, 2, 3), y[b0 : b0 + 6])
    rows.flush()
    assert calls == [18] * 5 + [10] and stats.rows == 100
    whole = _stats(x.double(), y.double())
    torch.testing.assert_close(stats.xtx, whole.xtx, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats.xty, whole.xty, rtol=1e-6, atol=1e-5)
    assert stats.tty == pytest.approx(whole.tty, rel=1e-6)


def test_a_wide_gram_matrix_from_blocks_equals_one_matmul():
    g = torch.Generator().manual_seed(6)
    for width in (96, 1024, 1500):  # one block; two; three of unequal width
        x = torch.randn(200, width, generator=g)
        stats = RidgeStats.zeros(width, 3)
        stats.add(x, x[:, :3])
        torch.testing.assert_close(stats.xtx, x.double().T @ x.double(), rtol=1e-5, atol=1e-4)
        assert torch.equal(stats.xtx, stats.xtx.T)


def _context_after_removal(model, removed, **options):
    adapter = adapter_for(model.config)
    opts = CompressionOptions(progress=False, batch_size=3, **options)
    ctx = CompressionContext(model, None, adapter, TOKENS, opts)
    _ = ctx.cache  # computes the teacher boundaries: the original model
    ctx.remove_layers(removed)
    return ctx


@torch.no_grad()
def test_refit_lowers_the_span_error_and_equals_a_direct_lstsq():
    model = tiny_model("llama", seed=3)
    ctx = _context_after_removal(model, [2])  # layer 1 now stands for original layers 1-2
    cache, adapter = ctx.cache, ctx.adapter
    layer, kwargs = ctx.layers[1], cache.layer_kwargs[1]
    teacher = cache.teacher[3]  # the original model's state leaving layer 2

    # Inputs and targets gathered by hand, all tokens at once.
    seen = {}
    handle = adapter.down_proj(layer).register_forward_hook(lambda m, a, o: seen.update(z=a[0], m=o))
    out = layer(cache.h[1], **kwargs)
    handle.remove()
    z = seen["z"].reshape(-1, seen["z"].shape[-1]).double()
    y = (teacher - (out - seen["m"])).reshape(-1, teacher.shape[-1]).double()
    w0 = adapter.down_proj(layer).weight.double()
    lam = 0.05 * (z.T @ z).diagonal().mean()
    xa = torch.cat([z, lam.sqrt() * torch.eye(z.shape[1], dtype=torch.float64)])
    ya = torch.cat([y, lam.sqrt() * w0.T])
    direct = torch.linalg.lstsq(xa, ya).solution.T

    refitted, record = _refit(ctx, 1, 0.05)
    torch.testing.assert_close(adapter.down_proj(refitted).weight.double(), direct, rtol=1e-4, atol=1e-5)
    # The span error, measured by running the layers, drops and matches the record.
    before = ((out - teacher) ** 2).sum() / (teacher**2).sum()
    new_out = refitted(cache.h[1], **kwargs)
    after = ((new_out - teacher) ** 2).sum() / (teacher**2).sum()
    assert after < before
    assert record["error_before"]["calibration"] == pytest.approx(before.item(), rel=1e-4)
    assert record["error_after"]["calibration"] == pytest.approx(after.item(), rel=1e-4)
    assert record["covers"] == [1, 2] and record["rows"] == TOKENS.numel()


@torch.no_grad()
def test_refit_statistics_under_autocast_sum_the_bfloat16_pass_in_full_precision():
    """With `autocast` on, only the layer's pass runs in bfloat16: the statistics of what it output are summed
    as in float32 (summed under autocast, each product would round to bfloat16 and the quadratic forms of the
    errors would not even stay positive)."""
    model = tiny_model("llama", seed=3)
    ctx = _context_after_removal(model, [2], autocast="on")
    assert ctx.execution_notes["layer_pass_precision"] == "bfloat16 autocast"
    cache, adapter = ctx.cache, ctx.adapter
    layer, kwargs = ctx.layers[1], cache.layer_kwargs[1]
    seen = {}
    handle = adapter.down_proj(layer).register_forward_hook(lambda m, a, o: seen.update(z=a[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(cache.h[1], **kwargs)
    bf16_z = seen["z"].reshape(-1, seen["z"].shape[-1]).double()
    layer(cache.h[1], **kwargs)
    handle.remove()
    fp32_z = seen["z"].reshape(-1, seen["z"].shape[-1]).double()
    fit, held = collect_stats(cache, 1, layer, kwargs, 3, adapter)
    gram = fit.xtx + held.xtx
    torch.testing.assert_close(gram, bf16_z.T @ bf16_z, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gram, fp32_z.T @ fp32_z, rtol=1e-5, atol=1e-6)
    _, record = _refit(ctx, 1, 0.05)
    assert 0 < record["error_after"]["calibration"] < record["error_before"]["calibration"]


def _refit(ctx, k, damping):
    ctx.options.refit_damping = damping
    return ctx.refit_candidate(k)


@torch.no_grad()
def test_held_out_rows_are_every_fourth_sequence():
    model = tiny_model("llama", seed=3)
    ctx = _context_after_removal(model, [2])
    layer = ctx.layers[1]
    fit, held = collect_stats(ctx.cache, 1, layer, ctx.cache.layer_kwargs[1], 3, ctx.adapter)
    n, s = TOKENS.shape
    assert held.rows == (n // HOLDOUT_EVERY) * s and fit.rows + held.rows == n * s


@pytest.mark.parametrize("method", ["shortgpt", "come", "reverse", "sleb", "come-p", "laco", "taylor+"])
def test_refit_runs_with_every_method_and_is_recorded(method):
    result = compress(LoadedModel(tiny_model("llama", seed=4), None, {}), target_layers=4, method=method,
                      tokens=TOKENS, progress=False, refit=True, search_samples=4, granularity=2)
    spans = [layer for layer in result.plan["layers"] if len(layer["covers"]) > 1]
    assert spans and all("refit" in layer for layer in spans)
    for layer in spans:
        record = layer["refit"]
        assert record["covers"] == [layer["covers"][0], layer["covers"][-1]]
        if record["applied"]:  # applied only when it lowers the held-out error
            assert record["error_after"]["held_out"] < record["error_before"]["held_out"]
    assert result.plan["options"]["refit"] is True


# -- replaceme ---------------------------------------------------------------------
@torch.no_grad()
def test_folded_transform_equals_applying_it_explicitly():
    model = tiny_model("llama", seed=5)
    adapter = adapter_for(model.config)
    layer = adapter.layers(model)[2]
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 8
    x = torch.randn(2, TOKENS.shape[1], 64)  # the kwargs (rotary positions) are for this length
    ctx = CompressionContext(model, None, adapter, TOKENS, CompressionOptions(progress=False))
    kwargs = ctx.cache.layer_kwargs[2]
    seen = {}
    handle = adapter.down_proj(layer).register_forward_hook(lambda m, a, o: seen.update(m=o))
    out = layer(x, **kwargs)
    handle.remove()
    explicit = (out - seen["m"]).double() + seen["m"].double() @ t  # r + m T
    folded = fold(adapter, layer, t)(x, **kwargs)
    torch.testing.assert_close(folded.double(), explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["lstsq", "cosine"])
def test_replaceme_removes_the_closest_block_and_fits_it(objective):
    model = tiny_model("llama", seed=6)
    reference = copy.deepcopy(model)
    result = compress(LoadedModel(model, None, {}), target_layers=3, method="replaceme", tokens=TOKENS,
                      progress=False, replaceme_objective=objective)
    step = result.plan["steps"][0]
    distance = step["distance"]
    start = min(range(1, len(distance)), key=lambda i: (distance[i], i))
    assert step["block"] == [start, start + 2] and step["covers"] == [start, start + 1, start + 2]
    owner = result.plan["layers"][start - 1]
    assert owner["covers"] == list(range(start - 1, start + 3)) and owner["transform"]["objective"] == objective
    if objective == "lstsq":  # least squares cannot do worse than the identity (no map)
        assert step["fit"]["error_after"] < step["fit"]["error_before"]
    # Only the owner's down_proj changed among the kept layers.
    kept = adapter_for(model.config).layers(result.model)
    original = adapter_for(reference.config).layers(reference)
    for new_index, old_index in enumerate([c[0] for c in (l["covers"] for l in result.plan["layers"])]):
        for key, value in kept[new_index].state_dict().items():
            same = torch.equal(value, original[old_index].state_dict()[key])
            assert same != (new_index == start - 1 and key == "mlp.down_proj.weight")


def test_block_sizes():
    assert block_sizes(7, 1) == [7] and block_sizes(7, 3) == [3, 2, 2] and block_sizes(2, 5) == [1, 1]


@torch.no_grad()
def test_a_zero_gain_post_norm_channel_keeps_its_weights_and_the_refit_stays_finite():
    """Gemma-3-270M has post-FFN norm channels of gain exactly 0 (weight -1 with the 1 + w gain):
    the linearised target divided by the gain was NaN, and so was every refitted deletion."""
    model = tiny_model("gemma3", seed=3)
    adapter = adapter_for(model.config)
    norm = adapter.ffn_output(adapter.layers(model)[1])
    norm.weight[5] = -adapter.norm_offset  # gain 0 on channel 5
    ctx = _context_after_removal(model, [2])  # layer 1 now stands for original layers 1-2
    w0 = adapter.down_proj(ctx.layers[1]).weight.clone()
    refitted, record = _refit(ctx, 1, 0.05)
    assert all(torch.isfinite(torch.tensor(v)) for v in (*record["error_before"].values(), *record["error_after"].values()))
    assert record["applied"] and record["error_after"]["calibration"] < record["error_before"]["calibration"]
    w = adapter.down_proj(refitted).weight
    assert torch.isfinite(w).all() and not torch.equal(w, w0)
    torch.testing.assert_close(w[5], w0[5], rtol=1e-5, atol=1e-7)  # the ridge pull toward W0 is all it has
