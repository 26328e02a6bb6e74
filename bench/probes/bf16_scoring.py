# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""The default at a ratio with its candidate losses in float32 or under bfloat16 autocast (argv: mode, ratio,
out.json[, model[, output folder]]; mode `off`: `--search-autocast off --autocast off`; `all`: `--search-autocast on
--autocast off`, the candidates' layers and the LM head under autocast; `passes`: `--search-autocast on --autocast
on`, every layer pass under autocast).
Writes the plan's layers, every step's candidate losses and the CPU time; `compare A.json B.json` prints
where two runs' picks differ and how far their losses moved.
    OMP_NUM_THREADS=1 python bench/probes/bf16_scoring.py off 0.3 off.json   (one per mode, at once)
    OMP_NUM_THREADS=1 python bench/probes/bf16_scoring.py off 0.1 off.json gemma3-270m
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(mode: str, ratio: float, out: str, model: str | None = None, save: str | None = None) -> None:
    import come
    from come.engine.allocator import keep_freed_memory
    from come.engine.models import load_model
    from come.engine.options import resolve_options
    from come.evaluation.data import calibration_tokens
    from come.methods import method_defaults

    keep_freed_memory()
    loaded = load_model(model)
    calib = resolve_options(method_defaults("come-search"), {})
    tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
    cpu = time.process_time()
    result = come.compress(loaded, ratio=ratio, tokens=tokens, progress=False,
                           search_autocast="off" if mode == "off" else "on", autocast="on" if mode == "passes" else "off",
                           **({"out": save, "overwrite": True} if save else {}))
    seconds = time.process_time() - cpu
    steps = [[(c.get("screen_loss"), c["loss"]) for c in s["candidates"]] for s in result.plan["steps"]]
    Path(out).write_text(json.dumps({"mode": mode, "cpu_seconds": seconds, "layers": result.plan["layers"],
                                     "steps": steps,
                                     "chosen": [s["chosen"]["covers"] for s in result.plan["steps"]]}))
    print(mode, "cpu", round(seconds, 1))


def compare(a: str, b: str) -> None:
    from cost_smollm2 import plan_differences

    x, y = (json.loads(Path(p).read_text()) for p in (a, b))
    def layers(d):  # a run of this probe, or a method-table cell
        return d.get("layers") or d["plan_layers"]

    print(a, b, plan_differences(layers(x), layers(y)))
    for i, (sx, sy) in enumerate(zip(x.get("steps", []), y.get("steps", []))):
        both = [j for j, (p, q) in enumerate(zip(sx, sy)) if p[1] is not None and q[1] is not None]
        gaps = [abs(sx[j][1] - sy[j][1]) for j in both]
        # The pick's margin in A (runner-up's loss minus the winner's) and how far B moved that difference.
        w = min(both, key=lambda j: sx[j][1])
        margins = [((sx[j][1] - sx[w][1]), (sy[j][1] - sy[w][1]) - (sx[j][1] - sx[w][1])) for j in both if j != w]
        if not margins:  # the runs' finalists differ: no runner-up scored in both
            print(f"step {i}: largest loss difference {max(gaps, default=0):.2e}; no common runner-up")
            continue
        margin = min(margins)
        print(f"step {i}: largest loss difference {max(gaps, default=0):.2e}; winner's margin {margin[0]:.2e}, "
              f"moved by {margin[1]:+.2e}")


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    elif sys.argv[1] not in ("off", "all", "passes"):
        sys.exit(f"mode must be off, all, passes or compare, not {sys.argv[1]!r}")
    else:
        run(sys.argv[1], float(sys.argv[2]), sys.argv[3], *sys.argv[4:6])
