# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""The damping walk at Qwen2-0.5B's FFN width (d_ffn 4864 -> hidden 896): float64 walk vs the float32 screen.
Statistics from synthetic activations with a spread of scales (as FFN activations have), one thread."""
import time

import torch

from come.core import refit

torch.manual_seed(0)
d, h, rows = 4864, 896, 16384
z = torch.randn(rows, d) * torch.logspace(-2, 0.5, d)
y = z[:, :h] @ torch.randn(h, h) * 0.05 + z @ (torch.randn(d, h) * 0.01) + torch.randn(rows, h)
cut = rows * 3 // 4
fit, held = refit.RidgeStats.zeros(d, h), refit.RidgeStats.zeros(d, h)
for a in range(0, cut, 2048): fit.add(z[a:min(a + 2048, cut)], y[a:min(a + 2048, cut)], y[a:min(a + 2048, cut)])
for a in range(cut, rows, 2048): held.add(z[a:a + 2048], y[a:a + 2048], y[a:a + 2048])
w0 = torch.randn(h, d) * 0.01
w0t = w0.double().T
fw, hw = fit.xtx @ w0t, held.xtx @ w0t
e0 = refit._error_with(held, w0t, hw)
for name, dtype in (("float64 walk", torch.float64), ("float32 screen", torch.float32)):
    path = refit._HeldOutPath(fit, held, w0t, fw, hw, e0, dtype)
    t = time.process_time(); best, scores = refit.lowest_on_grid(path, refit.DAMPING_GRID); t = time.process_time() - t
    print(f"{name}: {t:.1f} CPU-s, {len(scores)} solves ({t / len(scores):.2f} s each), chose {best}, separated {refit._separated([*scores.values(), e0], e0)}", flush=True)
t = time.process_time(); r = refit.choose_and_solve(fit, held, w0, "auto"); t = time.process_time() - t
print(f"choose_and_solve auto (screen + final float64 solve): {t:.1f} CPU-s, damping {r.record['damping']}")
