# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""torch linear GFLOP/s on this CPU for SmolLM2-135M's projection and LM-head shapes at several row counts, and two
row-independence checks. OMP_NUM_THREADS=1 python bench/probes/linear_rates.py"""
import time

import torch

torch.manual_seed(0)
for (o, i) in ((1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576)):
    W = torch.randn(o, i); 
    for rows in (128, 512, 1024, 2048, 4096):
        x = torch.randn(rows, i)
        torch.nn.functional.linear(x, W)
        n = max(3, int(2e10 / (2*rows*i*o)))
        t = time.perf_counter()
        for _ in range(n): torch.nn.functional.linear(x, W)
        dt = (time.perf_counter() - t) / n
        print(o, i, rows, f"{2*rows*i*o/dt/1e9:.1f} GFLOPS")
x = torch.randn(1024, 576); W1 = torch.randn(1536,576); W2=torch.randn(1536,576)
a = torch.cat([torch.nn.functional.linear(x, W1), torch.nn.functional.linear(x, W2)], 1)
b = torch.nn.functional.linear(x, torch.cat([W1, W2]))
print("fused equal:", torch.equal(a, b))
x2 = torch.randn(2048, 576); x2[:1024] = x
print("row-independent:", torch.equal(torch.nn.functional.linear(x2, W1)[:1024], torch.nn.functional.linear(x, W1)), torch.equal(torch.nn.functional.linear(x2[:512], W1), torch.nn.functional.linear(x, W1)[:512]))
print(torch.__config__.show()[:600])
