# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""User and system CPU seconds and minor page faults of one candidate refit at a wide FFN (synthetic
activations: d_ffn 4,864, hidden 896, 16,384 rows in batches of 1,024 as `collect_stats` adds them, then
`choose_and_solve` "auto"), three times in one process (the later ones show the steady state); with `keep`,
under the `come` command's allocator policy (`keep_freed_memory`).
    OMP_NUM_THREADS=1 python bench/probes/page_faults.py [keep]
"""
import resource
import sys
import time

import torch

from come.engine.allocator import keep_freed_memory

if sys.argv[1:] == ["keep"]:
    print("policy in effect:", keep_freed_memory())

from come.core.refit import HOLDOUT_EVERY, RidgeStats, _Rows, choose_and_solve

n, m, tokens, batch = 4864, 896, 16384, 1024
g = torch.Generator().manual_seed(0)
z = torch.randn(tokens, n, generator=g) * torch.logspace(-1.5, 1.5, n)[torch.randperm(n, generator=g)]
w0 = torch.randn(m, n, generator=g) / n**0.5
y = z @ (w0 + 0.3 * torch.randn(m, n, generator=g) / n**0.5).T + torch.randn(tokens, m, generator=g)

for rep in range(3):
    r0, w = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fit, held = RidgeStats.zeros(n, m), RidgeStats.zeros(n, m)
    fit_rows, held_rows = _Rows(fit), _Rows(held)
    seq = 128  # rows per sequence: every HOLDOUT_EVERY-th sequence is held out
    for b0 in range(0, tokens, batch):
        for s0 in range(b0, b0 + batch, seq):
            rows = held_rows if (s0 // seq) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else fit_rows
            rows.add(z[s0 : s0 + seq], y[s0 : s0 + seq], y[s0 : s0 + seq])
    fit_rows.flush(), held_rows.flush()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    result = choose_and_solve(fit, held, w0, "auto")
    r2 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"rep {rep}: statistics user {r1.ru_utime - r0.ru_utime:.2f} sys {r1.ru_stime - r0.ru_stime:.2f} "
          f"faults {r1.ru_minflt - r0.ru_minflt}; solve user {r2.ru_utime - r1.ru_utime:.2f} "
          f"sys {r2.ru_stime - r1.ru_stime:.2f} faults {r2.ru_minflt - r1.ru_minflt}; "
          f"wall {time.perf_counter() - w:.2f} s; damping {result.record['damping']}", flush=True)
