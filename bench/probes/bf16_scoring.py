# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""The default at a ratio on SmolLM2 with its candidate losses computed under bfloat16 autocast (argv: mode,
ratio, out.json[, model]; mode `off`: as shipped; `layers`: the candidates' layers under autocast, the final norm and
LM head in float32; `all`: layers and head under autocast). Writes the plan's layers, every step's candidate
losses and the CPU time; `compare A.json B.json` prints where two runs' picks differ.
    OMP_NUM_THREADS=1 python bench/probes/bf16_scoring.py off 0.3 off.json   (one per mode, at once)
    OMP_NUM_THREADS=1 python bench/probes/bf16_scoring.py off 0.1 off.json gemma3-270m
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(mode: str, ratio: float, out: str, model: str | None = None) -> None:
    import torch

    import come
    from come.core.scoring import BoundaryCache
    from come.engine.allocator import keep_freed_memory
    from come.engine.models import load_model
    from come.engine.options import resolve_options
    from come.evaluation.data import calibration_tokens
    from come.methods import method_defaults

    keep_freed_memory()
    original_loss, original_run = BoundaryCache.loss_sum_through, BoundaryCache.run_through

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def run_layers_in_bf16(self, *args, **kwargs):
        with autocast():
            outs = list(original_run(self, *args, **kwargs))
        for rows, x in outs:
            yield rows, x.float()

    def loss(self, *args, **kwargs):
        if mode == "all":
            with autocast():
                return original_loss(self, *args, **kwargs)
        self.run_through = run_layers_in_bf16.__get__(self)
        try:
            return original_loss(self, *args, **kwargs)
        finally:
            del self.run_through

    if mode != "off":
        BoundaryCache.loss_sum_through = loss
    loaded = load_model(model)
    calib = resolve_options(method_defaults("come-search"), {})
    tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
    cpu = time.process_time()
    result = come.compress(loaded, ratio=ratio, tokens=tokens, progress=False)
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
        gaps = [abs(p[1] - q[1]) for p, q in zip(sx, sy) if p[1] is not None and q[1] is not None]
        print(f"step {i}: largest loss difference {max(gaps, default=0):.2e}; losses", [p[1] for p in sx])


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[1], float(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
