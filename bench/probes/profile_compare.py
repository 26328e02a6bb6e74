# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""Seconds by part of the default's run from two `profile_default.py` profiles (cProfile times wall clock),
side by side with their ratio: e.g. one thread against two, to see which parts torch's threads speed up.
    python bench/probes/profile_compare.py ONE_THREAD.pstats TWO_THREADS.pstats
"""
import pstats
import sys

PARTS = {  # label: function name (cumulative seconds; the boundary updates include the calibration pass)
    "whole run": "go",
    "load": "load_model",
    "calibration tokens": "calibration_tokens",
    "boundary updates": "recompute_from",
    "candidate losses": "score_candidates",
    "refit statistics": "collect_stats",
    "refit walk and solve": "choose_and_solve",
    "save": "save_compressed",
}


def parts(path: str) -> dict:
    stats = pstats.Stats(path).stats
    out = {}
    for (_, _, name), (_, _, _, cumulative, _) in stats.items():
        for label, fn in PARTS.items():
            if name == fn:
                out[label] = max(out.get(label, 0.0), cumulative)
    return out


a, b = parts(sys.argv[1]), parts(sys.argv[2])
print(f"{'part':24s} {'first':>9s} {'second':>9s} {'first/second':>13s}")
for label in PARTS:
    x, y = a.get(label), b.get(label)
    if x is not None and y is not None:
        print(f"{label:24s} {x:9.1f} {y:9.1f} {x / max(y, 1e-9):13.2f}")
