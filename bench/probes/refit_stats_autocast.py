# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""The refit statistics of SmolLM2's layer K refitted to the original boundary T (argv: mode, K, T), with the
calibration pass and the statistics in float32 (`fp32`) or with the whole of `collect_stats` under bfloat16
autocast, its products included (`wrong`: the mistake `--autocast` avoids). Prints each part's terms of the
unchanged layer's error ||Z W0^T - Y||^2 = quad - 2 lin + yty and the refit's record:
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/probes/refit_stats_autocast.py fp32 11 13
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/probes/refit_stats_autocast.py wrong 11 13
"""
import sys

import torch

from come.core import refit, scoring
from come.core.adapters import adapter_for
from come.engine.models import load_model
from come.engine.options import resolve_options
from come.evaluation.data import calibration_tokens
from come.methods import method_defaults

mode, k, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode not in ("fp32", "wrong"):
    sys.exit(f"mode must be fp32 or wrong, not {mode!r}")
if mode == "wrong":
    def under_autocast(fn):
        def inner(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args, **kwargs)
        return inner

    scoring.BoundaryCache.run_layer = under_autocast(scoring.BoundaryCache.run_layer)
    refit.collect_stats = under_autocast(refit.collect_stats)
loaded = load_model(None)
calib = resolve_options(method_defaults("come-search"), {})
tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
adapter = adapter_for(loaded.model.config)
cache = scoring.BoundaryCache(loaded.model, adapter, tokens, storage_dtype=torch.bfloat16, progress=False)
layer = cache.layers[k]
fit, held = refit.collect_stats(cache, k, layer, cache.layer_kwargs[k], target, adapter)
down = adapter.down_proj(layer)
wt = down.weight.detach().double().T
for name, stats in (("fit", fit), ("held", held)):
    quad, lin = float((wt * (stats.xtx @ wt)).sum()), float((wt * stats.xty).sum())
    error = quad - 2 * lin + stats.yty
    print(mode, name, f"quad {quad:.6e} lin {lin:.6e} yty {stats.yty:.6e} tty {stats.tty:.6e} "
                      f"error {error:.4e} relative {error / stats.tty:.4e}")
print(mode, refit.choose_and_solve(fit, held, down.weight.detach(), "auto").record)
