# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""GFLOP/s of `linear` for SmolLM2's shapes (out x in, rows) in float32, in bfloat16, and with float32 inputs
under bfloat16 autocast, one thread:  python bench/probes/bf16_rates.py
"""
import time

import torch

torch.set_num_threads(1)


def rate(x, w, repeats=5) -> float:
    torch.nn.functional.linear(x, w)  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    return 2 * w.shape[0] * w.shape[1] * x.shape[0] * repeats / (time.process_time() - start) / 1e9


for out_features, in_features, rows in [(1536, 576, 2048), (576, 1536, 2048), (49152, 576, 1024), (576, 576, 2048)]:
    w, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
    line = [f"{out_features} x {in_features}, {rows} rows:"]
    for dtype in (torch.float32, torch.bfloat16):
        line.append(f"{str(dtype).removeprefix('torch.')} {rate(x.to(dtype), w.to(dtype)):.1f}")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        line.append(f"float32 under autocast {rate(x, w):.1f} GFLOP/s")
    print(" ".join(line))
