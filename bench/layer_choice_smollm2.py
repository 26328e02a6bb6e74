"""Which layer set does come-search's objective prefer? Calibration loss of replayed layer choices.

Each set of original layers is deleted with `drop` and refitted (`--refit`, the default method's
128 x 128 Wikipedia calibration), then scored by next-token cross-entropy on the calibration
sequences the search scores (the first `search_samples`, 16) and on the next 48 it never scores.
Used to tell a search failure (a better set by the search's own objective that it did not find) from an
objective that disagrees with held-out evaluation.

    python bench/layer_choice_smollm2.py --sets "12-18,20" "5,12-18" --results bench/results/layer_choice_smollm2
    python bench/layer_choice_smollm2.py --sets "12-18,20" "5,12-18" --score-seqlen 512 --results bench/results/layer_choice_smollm2_512
    python bench/layer_choice_smollm2.py --sets "12-18,20" "5,12-18" --score-source lambada --results bench/results/layer_choice_smollm2_lambada
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _results  # bench/ is on sys.path when a bench script runs
import torch

HERE = Path(__file__).resolve().parent


def parse_set(text: str) -> list[int]:
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        layers += list(range(int(lo), int(hi or lo) + 1))
    return sorted(set(layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", required=True, help='layer sets such as "5,12-18"')
    parser.add_argument("--scored", type=int, default=16, help="sequences the search scores (come-search: 16)")
    parser.add_argument("--others", type=int, default=48, help="further calibration sequences, never scored")
    parser.add_argument("--score-seqlen", type=int, default=128,
                        help="length of the scored windows (come-search: 128, its calibration length); other lengths "
                             "draw other calibration windows, to ask whether the window length changes the preferred set")
    parser.add_argument("--score-source", default="wikipedia",
                        help="text of the scored windows (its calibration split): wikipedia, the search's own, or lambada, "
                             "to ask whether the preferred set depends on the domain")
    parser.add_argument("--results", default=str(HERE / "results" / "layer_choice_smollm2"))
    args = parser.parse_args()

    from come import compress
    from come.engine.models import load_model
    from come.evaluation.data import calibration_tokens

    rows, tokens = [], None
    for text in args.sets:
        layers = parse_set(text)
        loaded = load_model(None)  # compress changes the model it is given: a fresh copy per set
        if tokens is None:
            # 128 windows at least: at 128 tokens these are exactly the default's calibration sequences
            tokens = calibration_tokens(loaded.tokenizer, args.score_source, max(128, args.scored + args.others), args.score_seqlen)
        result = compress(loaded, target_layers=loaded.model.config.num_hidden_layers - len(layers), method="drop",
                          drop_layers=tuple(layers), refit=True, nsamples=128, seqlen=128, progress=False)
        losses = {}
        with torch.no_grad():
            for name, ids in (("scored", tokens[: args.scored]), ("others", tokens[args.scored : args.scored + args.others])):
                losses[name] = result.model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        rows.append({"deleted": text, "score_source": args.score_source, "score_seqlen": args.score_seqlen, "layers": result.model.config.num_hidden_layers, "loss_scored": round(losses["scored"], 4),
                     "loss_others": round(losses["others"], 4)})
        print(rows[-1], flush=True)
    lines = [
        "# Calibration loss of replayed layer choices (SmolLM2-135M, `drop` + refit)",
        "",
        f"Command: `{_results.command_line()}`  ",
        f"Machine: {_results.machine(torch.get_num_threads())}.  ",
        f"Refit calibration: 128 x 128 Wikipedia tokens (seed 0). Loss on {args.scored + args.others} windows of "
        f"{args.score_seqlen} tokens from the calibration split of {args.score_source} (seed 0): the first {args.scored} "
        f"(for Wikipedia at 128 tokens, the sequences come-search scores) and the next {args.others}.",
        "",
        "| deleted original layers | layers | loss, scored sequences | loss, other sequences |",
        "|---|---|---|---|",
        *(f"| {r['deleted']} | {r['layers']} | {r['loss_scored']:.4f} | {r['loss_others']:.4f} |" for r in rows),
    ]
    _results.write(args.results, lines, rows=rows)


if __name__ == "__main__":
    main()
