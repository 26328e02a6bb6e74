"""The model card of a compressed model: what was done (the plan, as text and as a picture) and, once
evaluated, how good the result is next to the dense model, with `model-index` metadata in the Hub's format."""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.tasks import CHANCE
from ..outputs import atomic_file, atomic_write_text
from .plan import PLAN_FILE

PLAN_PICTURE = "come_plan.png"
EVAL_FILE = "come_eval.json"


# -- picture ------------------------------------------------------------------------
def plan_figure(plan: dict, path: str | Path) -> Path:
    """Original layers on the left, output layers on the right; a band joins each output layer to the
    original layers it stands for, and a merged layer's bar is split by the channel share of each source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon, Rectangle

    n_orig, layers = plan["original_layers"], plan["layers"]
    n_out = len(layers)
    height = max(n_orig, n_out)
    fig, ax = plt.subplots(figsize=(6, max(4, 0.22 * height + 1.5)))
    y_orig = lambda i: height - 1 - i * (height - 1) / max(1, n_orig - 1)
    y_out = lambda k: height - 1 - k * (height - 1) / max(1, n_out - 1)
    colors = plt.get_cmap("tab20")
    for i in range(n_orig):
        ax.add_patch(Rectangle((0, y_orig(i) - 0.35), 1, 0.7, color="0.85"))
        ax.text(-0.1, y_orig(i), str(i), ha="right", va="center", fontsize=7)
    for k, layer in enumerate(layers):
        covers, color = layer["covers"], colors(k % 20)
        top, bottom = y_orig(covers[0]) + 0.35, y_orig(covers[-1]) - 0.35
        ax.add_patch(Polygon([(1, top), (3, y_out(k) + 0.35), (3, y_out(k) - 0.35), (1, bottom)], color=color, alpha=0.35))
        shares = _channel_shares(layer)
        x = 3.0
        for share in shares:
            ax.add_patch(Rectangle((x, y_out(k) - 0.35), share, 0.7, color=color, alpha=0.5 + 0.5 * (x == 3.0), ec="white"))
            x += share
        how = "merged" if layer.get("merged") else ("deleted span" if len(covers) > 1 else "kept")
        extra = " + refit" if (layer.get("refit") or {}).get("applied") else ""
        ax.text(4.1, y_out(k), f"{k}: {covers[0]}" + (f"-{covers[-1]} {how}{extra}" if len(covers) > 1 else ""),
                va="center", fontsize=7)
    ax.set_xlim(-0.6, 6.5)
    ax.set_ylim(-1, height)
    ax.axis("off")
    ax.set_title(f"{plan['method']}: {n_orig} -> {n_out} layers ({plan['removed_parameter_fraction']:.1%} of parameters removed)",
                 fontsize=9)
    ax.text(0.5, height - 0.2, "original", ha="center", fontsize=8)
    ax.text(3.5, height - 0.2, "output (bar: channel share per source)", ha="center", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # the format is named: the temporary's name has no .png
        fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:] or "png")
    plt.close(fig)
    return Path(path)


def _channel_shares(layer: dict) -> list[float]:
    """Width fractions of a merged layer's bar, one per source (its FFN neurons kept); [1] otherwise."""
    merge = layer.get("merge") or {}
    sources = merge.get("sources")
    if not sources:
        return [1.0]
    counts = [len(s.get("neurons", [])) for s in sources]
    total = sum(counts) or 1
    return [c / total for c in counts]


# -- card ---------------------------------------------------------------------------
def _rows_of(evaluation: dict) -> dict[str, tuple[float, float | None, str]]:
    """{metric label: (value, stderr, details)} of one `come eval` result."""
    rows = {}
    for source, r in evaluation.get("perplexity", {}).items():
        rows[f"{source} perplexity"] = (r["ppl"], None, f"{r['tokens']} tokens, windows of {r['seqlen']}")
        f = (evaluation.get("fidelity") or {}).get(source)
        if f:
            rows[f"{source} KL to the source model"] = (f["kl"], None, f"nats/token over {f['tokens']} tokens (0 for the source itself)")
            rows[f"{source} top-1 agreement"] = (f["top1"], None, "share of positions where both pick the same next token")
    zs = evaluation.get("zero_shot")
    if zs:
        for task, r in zs["tasks"].items():
            metric = r["average_metric"]
            chance = f", chance {CHANCE[task]:g}" if task in CHANCE else ""
            rows[f"{task} ({metric})"] = (r[metric], r.get(f"{metric}_stderr"), f"{r['n']} documents{chance}")
        rows["zero-shot average"] = (zs["average"], zs.get("average_stderr"), f"limit {zs.get('limit')}")
        kept = (evaluation.get("skill") or {}).get("skill_kept")
        if kept is not None:
            rows["skill kept"] = (kept, None, "share of the source model's accuracy above chance, summed over "
                                  + ", ".join(evaluation["skill"]["counted"]) + " (where it is > 2 stderr above chance)")
    return rows


def _fmt(value, stderr) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return text + (f" ± {stderr:.4f}" if stderr is not None else "")


def results_table(evaluation: dict, dense: dict | None) -> str:
    ours, ref = _rows_of(evaluation), _rows_of(dense) if dense else {}
    lines = ["| metric | dense | compressed | details |", "|---|---|---|---|"]
    for label, (value, se, details) in ours.items():
        ref_value, ref_se = (ref.get(label) or (None, None, ""))[:2]
        lines.append(f"| {label} | {_fmt(ref_value, ref_se)} | {_fmt(value, se)} | {details} |")
    return "\n".join(lines)


def card_metadata(plan: dict, evaluation: dict | None):
    """The card's YAML front matter (huggingface_hub's ModelCardData, with model-index results)."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    name = f"{plan['model'].get('name', 'model')}-come-{plan['final_layers']}L"
    if evaluation:
        for source, r in evaluation.get("perplexity", {}).items():
            results.append(EvalResult(task_type="text-generation", dataset_type=source, dataset_name=source,
                                      dataset_split="held-out", metric_type="perplexity", metric_value=round(r["ppl"], 4),
                                      metric_name="Perplexity"))
        zs = evaluation.get("zero_shot") or {}
        for task, r in (zs.get("tasks") or {}).items():
            metric = r["average_metric"]
            results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type=metric, metric_value=round(r[metric], 4),
                                      metric_name=f"{metric} ({r['n']} documents, stderr {r.get(metric + '_stderr') or 0:.4f})"))
    return ModelCardData(library_name="transformers", tags=["come", "layer-merging", "depth-pruning"],
                         model_name=name, eval_results=results or None)


def model_card(plan: dict, evaluation: dict | None = None, dense: dict | None = None) -> str:
    rows = "\n".join(
        f"| {layer['index']} | {', '.join(map(str, layer['covers']))} | "
        f"{'merged' if layer['merged'] else ('kept' if len(layer['covers']) == 1 else 'absorbed a deleted span')}"
        f"{' + refit' if (layer.get('refit') or {}).get('applied') else ''} |"
        for layer in plan["layers"]
    )
    calib = plan["calibration"]
    saved = plan.get("save_dtype") or {}
    quality = "Not evaluated yet: `come eval THIS_FOLDER --update-card` adds the results here."
    if evaluation:
        quality = (f"Measured with `come eval` (seed {evaluation.get('seed')}); ± is the standard error reported by "
                   "lm-evaluation-harness; the dense column is the source model under the same settings.\n\n"
                   + results_table(evaluation, dense))
    distilled = _distillation_text(plan.get("distillation"))
    body = f"""
# {plan['model'].get('name', 'model')} compressed with `come` ({plan['method']})

{plan['original_layers']} -> {plan['final_layers']} decoder layers,
{plan['original_parameters']:,} -> {plan['final_parameters']:,} parameters
({plan['removed_parameter_fraction']:.1%} removed). A standard checkpoint: load it with
`AutoModelForCausalLM.from_pretrained(path)`, no custom code.{f" Weights are stored as {saved['dtype']} ({saved['why']})." if saved else ""}

## Quality

{quality}

## What was done

Calibration: {calib['nsamples']} x {calib['seqlen']} tokens from `{calib['source'].get('name')}`, seed {calib['seed']}.
The full plan (sources of every layer, channels kept, scores and candidates at every step) is in `{PLAN_FILE}`;
`{PLAN_PICTURE}` draws it.

![plan]({PLAN_PICTURE})
{distilled}
| layer | original layers it stands for | how |
|---|---|---|
{rows}
"""
    return card_metadata(plan, evaluation).to_yaml().join(["---\n", "\n---\n"]) + body


def _distillation_text(record: dict | None) -> str:
    sel = (record or {}).get("selection")
    if not sel:
        return ""
    kept = {"input": "the input model, unchanged (training did not lower the held-out KL)", "stage1": "the stage-1 result",
            "stage2": f"stage 2 at step {(sel['candidates'].get('stage2') or {}).get('step')}"}[sel["chosen"]]
    budget = (record.get("stage2") or {}).get("time_budget")
    timed = (f" Stage 2 ran {budget['steps']} steps, what `--time-budget {budget['minutes']:g}` (minutes) bought at "
             f"{budget['step_seconds']:.2f} s a step; `--global-steps {budget['steps']}` repeats the run." if budget else "")
    return (f"\nDistilled with `come distill` from its source model. Mean per-token KL to the source on "
            f"{sel['heldout']['tokens']} held-out tokens (never trained on): {sel['kl_before']:.4f} before, "
            f"{sel['kl_after']:.4f} after; the output is {kept}.{timed} Every check is in `metrics.jsonl`.\n")


def write_card(folder: str | Path, plan: dict, evaluation: dict | None = None, dense: dict | None = None) -> None:
    folder = Path(folder)
    plan_figure(plan, folder / PLAN_PICTURE)
    atomic_write_text(folder / "README.md", model_card(plan, evaluation, dense), what="model card")
    if evaluation is not None:
        atomic_write_text(folder / EVAL_FILE, json.dumps({"compressed": evaluation, "dense": dense}, indent=1),
                          what="model card")
