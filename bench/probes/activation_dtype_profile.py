# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""cProfile of the default's first 3 search steps on SmolLM2 (load, calibration, 30 -> 27 layers, no save) with the
activations in DTYPE (argv[2]: bfloat16 or float32), written to PROFILE (argv[1]). Two at once, one thread each:
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/probes/activation_dtype_profile.py PROFILE DTYPE
"""
import cProfile
import sys

import come  # noqa: F401 (used in the profiled statement)
from come.engine.models import load_model
from come.engine.options import resolve_options
from come.evaluation.data import calibration_tokens
from come.methods import method_defaults

loaded = load_model(None)
calib = resolve_options(method_defaults("come-search"), {})
tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
cProfile.run("come.compress(loaded, target_layers=27, tokens=tokens, progress=False, activation_dtype=sys.argv[2])",
             sys.argv[1])
