# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""search_scale's per-step breakdown on the real SmolLM2 (argv: steps, out json)."""
import json
import sys

sys.path.insert(0, sys.argv[3] + "/bench")
import search_scale

res = search_scale.worker(None, int(sys.argv[1]), None, None, None)
with open(sys.argv[2], "w") as f:
    json.dump(res, f, indent=1)
for s in res["steps"]:
    print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in s.items()})
print("cpu", res["cpu_seconds"], "rss", res["peak_rss_gb"])
