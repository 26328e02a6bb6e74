# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""CPU time and peak RSS of the default at a ratio on SmolLM2 (argv: ratio, label). Two checkouts side by side:
    OMP_NUM_THREADS=1 PYTHONPATH=<checkout>/src python bench/probes/rss_pair.py 0.3 <label> (one per checkout, at once)
"""
import resource
import sys
import time

import come
from come.engine.models import load_model
from come.engine.options import resolve_options
from come.evaluation.data import calibration_tokens
from come.methods import method_defaults

loaded = load_model(None)
calib = resolve_options(method_defaults("come-search"), {})
tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
c = time.process_time()
r = come.compress(loaded, ratio=float(sys.argv[1]), tokens=tokens, progress=False)
print(sys.argv[2], "cpu", round(time.process_time() - c, 1), "rss", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
