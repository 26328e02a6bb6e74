# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""The refit statistics' pieces at d_ffn 4,864 (one block of 5,376 rows, 896 outputs): full X^T X, the blocked
`_gram`, float64 accumulation and `RidgeStats.add`; wall and CPU seconds. PYTHONPATH=src python
bench/probes/gram_rates.py (default threads: 2 on the bench machine)"""
import time

import torch

from come.core.refit import RidgeStats, _gram

torch.manual_seed(0)
n, rows, dout = 4864, 5376, 896
x = torch.randn(rows, n); y = torch.randn(rows, dout)
def t(f, reps=3):
    f(); w=time.perf_counter(); c=time.process_time()
    for _ in range(reps): f()
    return (time.perf_counter()-w)/reps, (time.process_time()-c)/reps
print("threads", torch.get_num_threads())
print("full x.T@x   wall/cpu", t(lambda: x.T @ x))
print("_gram        wall/cpu", t(lambda: _gram(x)))
xt = x.T.contiguous()
print("xt@x contig  wall/cpu", t(lambda: xt @ x))
g = _gram(x)
acc = torch.zeros(n, n, dtype=torch.float64)
print(".double()    wall/cpu", t(lambda: g.double()))
print("acc += g.double()", t(lambda: acc.add_(g.double())))
print("acc += g (no copy)", t(lambda: acc.add_(g)))
print("xty          wall/cpu", t(lambda: x.T @ y))
s = RidgeStats.zeros(n, dout)
print("stats.add    wall/cpu", t(lambda: s.add(x, y, y)))
print("GFLOP gram half", 0.5625*n*n*rows*2/1e9, "full", n*n*rows*2/1e9, "xty", n*dout*rows*2/1e9)
