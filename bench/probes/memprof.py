# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""Where does come-search's peak RSS come from? Wrap the heavy functions, record ru_maxrss growth per call site."""
import json
import os
import resource
import sys
import threading
import time

import come
from come.core import refit
from come.core.scoring import BoundaryCache
from come.engine.models import load_model
from come.engine.options import resolve_options
from come.evaluation.data import calibration_tokens
from come.methods import DEFAULT_METHOD, method_defaults


def rss():  # current RSS GB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
peak = {"v": 0.0, "where": None}
stack = []
def sampler():
    while True:
        r = rss()
        if r > peak["v"]:
            peak["v"], peak["where"] = r, list(stack)
        time.sleep(0.005)
threading.Thread(target=sampler, daemon=True).start()
entry = {}
def tag(name, fn):
    def w(*a, **k):
        entry.setdefault(name, []).append(round(rss(), 3))
        stack.append(name)
        try: return fn(*a, **k)
        finally: stack.pop()
    return w
for cls, names in ((BoundaryCache, ["loss_through", "recompute_from", "channel_sensitivity", "skip_error", "window_distance", "block_influence"]),):
    for n in names: setattr(cls, n, tag(n, getattr(cls, n)))
refit.collect_stats = tag("collect_stats", refit.collect_stats)
refit.choose_and_solve = tag("choose_and_solve", refit.choose_and_solve)
steps = int(sys.argv[1]); extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
stack.append("load"); loaded = load_model(None); stack.pop()
print("after load", rss(), flush=True)
calib = resolve_options(method_defaults(DEFAULT_METHOD), {})
tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
stack.append("compress")
c = time.process_time()
result = come.compress(loaded, tokens=tokens, progress=False, target_layers=30 - steps, **extra)
stack.pop()
print("cpu", time.process_time() - c, "peak sampled", peak, "maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "now", rss())
print({k: (min(v), max(v)) for k, v in entry.items()})
print(json.dumps([l["covers"] for l in result.plan["layers"]]))
