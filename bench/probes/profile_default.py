# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""cProfile of the default at 0.3 on SmolLM2 (load, calibration, search, save to /tmp/prof-out), written to
PROFILE (argv[1]); read it with pstats sorted by cumulative time. With `allocator` after it, under the
allocator policy of the `come` command (`keep_freed_memory`), as the cost run's processes are:
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/probes/profile_default.py PROFILE [allocator]
"""
import cProfile
import sys

import come
from come.engine.models import load_model
from come.engine.options import resolve_options
from come.evaluation.data import calibration_tokens
from come.methods import method_defaults


def go():
    loaded = load_model(None)
    calib = resolve_options(method_defaults("come-search"), {})
    tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
    come.compress(loaded, ratio=0.3, tokens=tokens, progress=False, out="/tmp/prof-out", overwrite=True)


if sys.argv[2:] == ["allocator"]:
    from come.engine.allocator import keep_freed_memory

    keep_freed_memory()
cProfile.run("go()", sys.argv[1])
