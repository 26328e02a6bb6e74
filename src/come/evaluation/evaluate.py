"""`come eval`: perplexity, zero-shot accuracy (lm-evaluation-harness) and speed of one model."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..errors import ComeError
from .tasks import CHANCE


@torch.no_grad()
def measure_speed(model, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and decode throughput (tokens/s), best of `repeats`, on random token ids.

    Decode time is a greedy `generate()` of exactly `new_tokens` tokens (KV
    cache on) minus one prefill, so dense and compressed models do equal work.
    """
    device = model.get_input_embeddings().weight.device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    prefill, decode = [], []
    model(ids[:, :8], use_cache=False)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, use_cache=True)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
        )
        # generate = one prefill + new_tokens - 1 cached decode steps
        decode.append(max(1e-9, time.perf_counter() - start - prefill[-1]))
    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch_size * prompt_len / min(prefill),
        "decode_tokens_per_s": batch_size * (new_tokens - 1) / min(decode),
        "threads": torch.get_num_threads(),
    }


_NO_REFERENCE = object()


def reference_source(plan: dict):
    """The model a plan was made from, as load_model takes it (None: the default built-in), or _NO_REFERENCE when it is
    not on this machine."""
    model = plan.get("model") or {}
    if model.get("builtin"):
        return model["builtin"]
    if model.get("kind") == "default":
        return None
    path = model.get("path")
    return path if path and Path(path).exists() else _NO_REFERENCE


def parse_list(value: str | None, all_values: tuple[str, ...]) -> list[str]:
    if value is None or value.strip().lower() in ("", "none"):
        return []
    if value.strip().lower() == "all":
        return list(all_values)
    return [v.strip() for v in value.split(",") if v.strip()]


def evaluate(
    model_dir: str | None,
    ppl_sources: list[str],
    tasks: list[str],
    limit: int | None = None,
    seqlen: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    speed: bool = False,
    offline: bool = True,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    reference=None,
    reference_scores: bool = True,
) -> dict:
    """Evaluate one model; returns a json-able dict with every number and its settings.

    `reference`: a model (folder, .gguf, built-in name) to compare next-token distributions with on
    the perplexity windows (KL and top-1 agreement, see `fidelity`); "plan" means the source model
    named in the folder's come_plan.json (skipped when the folder has none); None skips it. With tasks,
    `reference_scores` also scores the reference (once per machine and settings, cached) for the share of its
    skill above chance that the model keeps."""
    from ..artifacts.plan import PLAN_FILE, versions
    from ..engine.models import load_model
    from .data import eval_tokens

    if limit is not None and limit < 1:
        raise ComeError(f"--limit must be >= 1, got {limit}")
    if max_tokens is not None and max_tokens < 2:
        raise ComeError(f"--max-tokens must be >= 2, got {max_tokens}")
    if tasks and offline:
        from .tasks import PAPER_TASKS

        unknown = [t for t in tasks if t not in PAPER_TASKS]
        if unknown:  # checked before any model is loaded
            raise ComeError(f"unknown offline task(s) {', '.join(unknown)}; available: {', '.join(PAPER_TASKS)} (or --online)")
    torch.manual_seed(seed)
    loaded = load_model(model_dir, dtype=dtype, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    ref_loaded = None
    if reference is not None:
        ref_source = reference
        if reference == "plan":
            plan_file = Path(loaded.source.get("path", "")) / PLAN_FILE
            ref_source = reference_source(json.loads(plan_file.read_text())) if plan_file.is_file() else _NO_REFERENCE
        if ref_source is not _NO_REFERENCE:
            from .fidelity import check_same_vocabulary

            ref_loaded = load_model(ref_source, dtype=dtype, device=device)
            check_same_vocabulary(ref_loaded.model, model, ref_loaded.tokenizer, tokenizer)  # before any evaluation
    result: dict = {
        "model": loaded.source,
        "layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "seed": seed,
        "limit": limit,
        "versions": versions(),
        "perplexity": {},
    }
    plan_path = Path(loaded.source.get("path", "")) / PLAN_FILE
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        result["plan"] = {k: plan.get(k) for k in ("method", "original_layers", "final_layers", "removed_parameter_fraction")}
    if ref_loaded is not None:
        result["reference"] = ref_loaded.source
        result["fidelity"] = {}
    for source in ppl_sources:
        tokens = eval_tokens(tokenizer, source, max_tokens=max_tokens)
        if ref_loaded is not None:
            from .fidelity import fidelity, windows_of

            f = fidelity(ref_loaded.model, model, windows_of(tokens, seqlen), batch_size=max(1, batch_size // 2),
                         progress=progress, desc=f"KL to reference ({source})")
            result["fidelity"][source] = f
        result["perplexity"][source] = _perplexity_after(result["fidelity"].get(source) if ref_loaded else None,
                                                         model, tokens, seqlen, batch_size, progress)
    has_reference, ref_loaded = ref_loaded is not None, None  # not held while the tasks run (its cached evaluation loads it)
    if tasks:
        from .tasks import zero_shot

        result["zero_shot"] = zero_shot(model, tokenizer, tasks=tasks, limit=limit, batch_size=batch_size, seed=seed, offline=offline)
        ref_scores = None
        if has_reference and reference_scores:  # the reference's scores under the same settings, once per machine (as for the card)
            ref_eval = cached_evaluation(ref_source, {
                "ppl_sources": ppl_sources, "tasks": tasks, "limit": limit, "seqlen": seqlen, "max_tokens": max_tokens,
                "batch_size": batch_size, "seed": seed, "offline": offline, "dtype": dtype, "device": device}, progress)
            ref_scores = _task_scores(ref_eval["zero_shot"])
        result["skill"] = skill_above_chance({t: v for t, (v, _) in _task_scores(result["zero_shot"]).items()}, ref_scores)
    if speed:
        result["speed"] = measure_speed(model, seed=seed)
    return result


def _perplexity_after(fid: dict | None, model, tokens, seqlen: int, batch_size: int, progress: bool) -> dict:
    """`perplexity()`'s result for `tokens`. When a `fidelity` pass (`fid`) covered every token in full windows,
    its NLL is the model's and no further pass is run; a partial last window needs the perplexity pass."""
    if fid is not None and tokens.numel() % seqlen < 2:
        return {"ppl": math.exp(fid["nll"]), "nll": fid["nll"], "tokens": fid["windows"] * (fid["seqlen"] - 1),
                "seqlen": fid["seqlen"], "windows": fid["windows"]}
    from .perplexity import perplexity

    return perplexity(model, tokens, seqlen=seqlen, batch_size=max(1, batch_size // 2), progress=progress)


def fidelity_to_source(model_dirs: list, ppl_sources: list[str], seqlen: int = 512, max_tokens: int | None = None,
                       batch_size: int = 8, dtype: str = "float32", device: str = "cpu", progress: bool = True) -> list[dict]:
    """For several folders compressed from one source model: what `evaluate(folder, tasks=[], reference="plan")`
    returns for each (perplexity, KL and top-1 agreement to the source), with the source's pass shared by all."""
    from ..artifacts.plan import PLAN_FILE
    from ..engine.models import load_model
    from .data import eval_tokens
    from .fidelity import check_same_vocabulary, fidelity_many, windows_of

    sources = []
    for folder in model_dirs:
        plan_file = Path(folder) / PLAN_FILE
        sources.append(reference_source(json.loads(plan_file.read_text())) if plan_file.is_file() else _NO_REFERENCE)
    if _NO_REFERENCE in sources or any(s != sources[0] for s in sources):
        raise ComeError("the folders must all have a plan naming one source model that is on this machine")
    loaded = [load_model(str(folder), dtype=dtype, device=device) for folder in model_dirs]
    ref = load_model(sources[0], dtype=dtype, device=device)
    for one in loaded:
        check_same_vocabulary(ref.model, one.model, ref.tokenizer, one.tokenizer)
    results = [{"model": one.source, "layers": one.model.config.num_hidden_layers, "perplexity": {}, "fidelity": {},
                "reference": ref.source} for one in loaded]
    for source in ppl_sources:
        tokens = eval_tokens(ref.tokenizer, source, max_tokens=max_tokens)  # the same tokenizer: checked above
        many = fidelity_many(ref.model, dict(enumerate(one.model for one in loaded)), windows_of(tokens, seqlen),
                             batch_size=max(1, batch_size // 2), progress=progress, desc=f"KL to reference ({source})")
        for i, result in enumerate(results):
            result["fidelity"][source] = many[i]
            result["perplexity"][source] = _perplexity_after(many[i], loaded[i].model, tokens, seqlen, batch_size, progress)
    return results


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    name = result["model"].get("name") or result["model"].get("path")
    table = Table(title=f"come eval: {name} ({result['layers']} layers, {result['parameters']:,} params)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("details")
    for source, r in result["perplexity"].items():
        table.add_row(f"ppl {source}", f"{r['ppl']:.3f}", f"{r['tokens']} tokens, seqlen {r['seqlen']}")
        f = (result.get("fidelity") or {}).get(source)
        if f:
            table.add_row(f"KL to reference, {source}", f"{f['kl']:.4f}", f"nats/token over {f['tokens']} tokens, mean KL(reference || model)")
            table.add_row(f"top-1 agreement, {source}", f"{f['top1']:.4f}", "share of positions where both pick the same next token")
    zs = result.get("zero_shot")
    if zs:
        for task, r in zs["tasks"].items():
            acc_norm = "-" if r.get("acc_norm") is None else f"{r['acc_norm']:.4f}"
            se = r.get(f"{r['average_metric']}_stderr")
            shown = f"{r[r['average_metric']]:.4f}" + (f" ± {se:.4f}" if se is not None else "")
            table.add_row(task, shown, f"acc {r['acc']:.4f}, acc_norm {acc_norm}, n={r['n']} ({r['average_metric']} averaged)")
        se = zs.get("average_stderr")
        table.add_row("average", f"{zs['average']:.4f}" + (f" ± {se:.4f}" if se is not None else ""), f"limit {zs.get('limit')}")
        skill = result.get("skill") or {}
        above = ", ".join(f"{t} {r['skill']:+.3f} (chance {r['chance']:g})" for t, r in skill.get("tasks", {}).items())
        if above:
            table.add_row("accuracy - chance", "", above)
        if skill.get("skill_kept") is not None:
            table.add_row("skill kept", f"{skill['skill_kept']:.1%}", "of the reference's accuracy above chance, summed over "
                          + ", ".join(skill["counted"]) + " (where it is > 2 stderr above chance)")
    if "speed" in result:
        s = result["speed"]
        table.add_row("prefill tok/s", f"{s['prefill_tokens_per_s']:.1f}", f"batch {s['batch_size']}, prompt {s['prompt_len']}")
        table.add_row("decode tok/s", f"{s['decode_tokens_per_s']:.1f}", f"{s['new_tokens']} new tokens, KV cache")
    console.print(table)


def cached_evaluation(source, settings: dict, progress: bool = True) -> dict:
    """`evaluate(source, **settings)`, computed once per (source, settings) and kept in $COME_CACHE/evals."""
    import hashlib

    from ..engine.models import cache_dir
    from ..outputs import write_json_atomic

    key = hashlib.sha256(json.dumps([source, settings], sort_keys=True, default=str).encode()).hexdigest()[:16]
    cached = cache_dir() / "evals" / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    result = evaluate(source, progress=progress, **settings)
    write_json_atomic(cached, result)
    return result


def dense_reference(plan: dict, settings: dict, progress: bool = True) -> dict | None:
    """The evaluation of the model a plan was made from, under `settings` (evaluate's keyword
    arguments); cached in $COME_CACHE/evals so that every card of the same source reuses it."""
    source = reference_source(plan)
    if source is _NO_REFERENCE:
        return None  # the original is not here: the card shows the compressed model alone
    return cached_evaluation(source, settings, progress)




def skill_above_chance(scores: dict[str, float], reference: dict[str, tuple[float, float | None]] | None = None) -> dict:
    """Accuracy minus chance per task (`scores`: {task: accuracy}); with `reference` ({task: (accuracy,
    stderr)}, e.g. the dense model's), also the share of the reference's skill kept, summed over the tasks
    where the reference is more than two standard errors above chance (the others cannot lose skill)."""
    tasks = {t: {"chance": CHANCE[t], "skill": v - CHANCE[t]} for t, v in scores.items() if t in CHANCE}
    out: dict = {"tasks": tasks}
    if reference is not None:
        counted = []
        for t, row in tasks.items():
            if t in reference:
                value, se = reference[t]
                row["reference_skill"] = value - CHANCE[t]
                if value - CHANCE[t] > 2 * (se or 0.0):
                    counted.append(t)
        total = sum(tasks[t]["reference_skill"] for t in counted)
        out["counted"] = counted
        out["skill_kept"] = sum(tasks[t]["skill"] for t in counted) / total if counted else None
    return out


def _task_scores(zero_shot: dict) -> dict[str, tuple[float, float | None]]:
    return {t: (r[r["average_metric"]], r.get(f"{r['average_metric']}_stderr")) for t, r in zero_shot["tasks"].items()}


def update_card(folder: str | Path, evaluation: dict, settings: dict, progress: bool = True) -> Path:
    """Write `evaluation` (of `folder`, a `come compress` output) and the dense model's into its card."""
    from ..artifacts.card import write_card
    from ..artifacts.plan import PLAN_FILE

    folder = Path(folder)
    plan_file = folder / PLAN_FILE
    if not plan_file.is_file():
        raise ComeError(f"--update-card needs a folder written by come ({folder} has no {PLAN_FILE})")
    plan = json.loads(plan_file.read_text())
    write_card(folder, plan, evaluation, dense_reference(plan, settings, progress))
    return folder / "README.md"
