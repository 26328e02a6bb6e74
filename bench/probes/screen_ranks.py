# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""come-search's finalists screen on a real model: is the winner over all scored sequences among the
screen's best?

    python bench/probes/screen_ranks.py run exhaustive 0.3 OUT.json [MODEL]   # every candidate on all
        sequences, each candidate's per-sequence cross-entropy logged
    python bench/probes/screen_ranks.py run N:S 0.3 OUT.json [MODEL]          # the screen: N finalists of S
    python bench/probes/screen_ranks.py ranks OUT.json                         # from an exhaustive run: the
        winner's rank on a screen of the first S sequences, per step, for several S

MODEL: a built-in name (default: SmolLM2-135M). A run prints its CPU time and whether its picks equal the
committed come-search cell (smollm2_methods, or gemma3_zeroshot for gemma3-270m).
"""
import json
import resource
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))


def run(mode, ratio, out, model=None):
    import torch
    from cost_smollm2 import picks

    import come
    from come.core.scoring import BoundaryCache
    from come.engine.models import load_model
    from come.engine.options import resolve_options
    from come.evaluation.data import calibration_tokens
    from come.methods import method_defaults

    log = []
    if mode == "exhaustive":
        @torch.no_grad()
        def loss_sum_through(self, start, stack, samples=None, skip=0):  # the library's, plus a per-sequence log
            total, count, seqs = 0.0, 0, []
            with self.layers.head() as (norm, head):
                for rows, x in self.run_through(start, stack, samples, skip):
                    per_token = []
                    for part in self._head_chunks(x, head):
                        logp = torch.log_softmax(head(norm(x[part]))[:, :-1].float(), dim=-1)
                        labels = self.tokens[rows][part, 1:].to(logp.device)
                        per_token.append(-logp.gather(-1, labels.unsqueeze(-1)))
                    per_token = torch.cat(per_token)
                    total += float(per_token.sum())
                    count += per_token.shape[0] * per_token.shape[1]
                    seqs += per_token.double().sum(dim=(1, 2)).tolist()
            log.append(seqs)
            return total, count

        BoundaryCache.loss_sum_through = loss_sum_through
        options = {"search_finalists": 0}
    else:
        n, s = mode.split(":")
        options = {"search_finalists": int(n), "search_finalist_samples": int(s)}
    start, cpu = time.perf_counter(), time.process_time()
    loaded = load_model(model)
    calib = resolve_options(method_defaults("come-search"), {})
    tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
    result = come.compress(loaded, ratio=ratio, tokens=tokens, progress=False, **options)
    row = {"mode": mode, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "layer_passes": result.plan["execution"]["layer_passes"]}
    table = "gemma3_zeroshot" if model == "gemma3-270m" else "smollm2_methods"
    committed = BENCH / "results" / table / "cells" / f"come-search-r{ratio:g}.json"
    if committed.is_file():
        row["same_picks_as_committed"] = picks(json.loads(committed.read_text())["plan_layers"]) == picks(result.plan["layers"])
    print(json.dumps(row), flush=True)
    Path(out).write_text(json.dumps({"row": row, "steps": result.plan["steps"], "per_sequence": log}))


def ranks(path):
    data = json.loads(Path(path).read_text())
    calls = iter(data["per_sequence"])
    steps = [(step, [next(calls) for _ in step["candidates"]]) for step in data["steps"]]
    print("screen sequences: the winner's rank (0: first) on the screen, per step")
    for s in (1, 2, 4, 8):
        out = []
        for step, per_seq in steps:
            winner = step["candidates"].index(step["chosen"])
            screen = [sum(seqs[:s]) for seqs in per_seq]
            out.append(sorted(range(len(screen)), key=lambda i: (screen[i], i)).index(winner))
        print(f"S={s}: {out} -> finalists needed: {max(out) + 1}")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
    else:
        ranks(sys.argv[2])
