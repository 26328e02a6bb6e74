# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""Held-out damping scores: float64 (today) vs float32 Cholesky, on real SmolLM2 refit problems."""
import time

import torch

from come.core import refit
from come.core.adapters import adapter_for
from come.core.scoring import BoundaryCache
from come.engine.models import load_model
from come.evaluation.data import calibration_tokens

loaded = load_model(None)
tokens = calibration_tokens(loaded.tokenizer, "wikipedia", 128, 128, seed=0)
ad = adapter_for(loaded.model.config)
cache = BoundaryCache(loaded.model, ad, tokens, progress=False)
layers = loaded.model.model.layers
for owner, target in ((9, 11), (20, 22), (1, 3), (27, 29)):
    fit, held = refit.collect_stats(cache, owner, layers[owner], cache.layer_kwargs[owner], target, ad)
    w0 = ad.down_proj(layers[owner]).weight.detach()
    s64 = refit.held_out_path(fit, held, w0, refit.DAMPING_GRID)
    f32 = refit.RidgeStats(fit.xtx.float(), fit.xty.float(), fit.yty, fit.tty, fit.rows)
    h32 = refit.RidgeStats(held.xtx.float(), held.xty.float(), held.yty, held.tty, held.rows)
    def path32(fit, held, w0):
        F, H = fit.xtx.float(), held.xtx.float()
        w0t = w0.float().T
        r = fit.xty.float() - F @ w0t
        g = H @ w0t - held.xty.float()
        err0 = float(refit._error_with(held, w0.double().T, held.xtx @ w0.double().T))
        scale = float(fit.xtx.diagonal().mean())
        out = {}
        for d in refit.DAMPING_GRID:
            a = F.clone(); a.diagonal().add_(d * scale)
            delta = torch.cholesky_solve(r, torch.linalg.cholesky(a))
            out[d] = err0 + float(2 * (delta.double() * g.double()).sum() + (delta.double() * (H @ delta).double()).sum())
        return out
    t = time.process_time(); s32 = path32(fit, held, w0); t32 = time.process_time() - t
    t = time.process_time(); refit.held_out_path(fit, held, w0, refit.DAMPING_GRID); t64 = time.process_time() - t
    e0 = refit._error_with(held, w0.double().T, held.xtx @ w0.double().T)
    print(owner, target, f"t64 {t64:.2f} t32 {t32:.2f}", " ".join(f"{d:g}:{s64[d]/e0:.6f}/{abs(s32[d]-s64[d])/s64[d]:.1e}" for d in refit.DAMPING_GRID), flush=True)
