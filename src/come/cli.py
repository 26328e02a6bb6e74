"""Command-line interface: `come compress | eval | distill | bench | methods`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .methods import DEFAULT_METHOD  # light: the method modules are imported on first use
from .options import choice_enum, default, help_text  # light: one definition of every compression option
from .tasks import PAPER_TASKS  # light: lm-eval is imported only when tasks run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Make causal LMs shallower by merging adjacent decoder layers (CoMe) and compare against baselines.",
    pretty_exceptions_enable=False,
)


# Choices of the Literal options, from their one definition in options.py.
NormMode = choice_enum("norm")
OutputNorm = choice_enum("output_norm")
SbiTokens = choice_enum("sbi_tokens")
Storage = choice_enum("activation_storage")
SearchLoss = choice_enum("search_loss")
DeletionRank = choice_enum("search_deletion_rank")
ReplacemeObjective = choice_enum("replaceme_objective")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _user_errors():
    from .data import DataError
    from .errors import ComeError

    return (ComeError, DataError)


def print_summary(plan: dict, out_dir: Optional[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"come compress: {plan['method']}", show_lines=False)
    table.add_column("new layer", justify="right")
    table.add_column("original layers")
    table.add_column("kept KV groups / neurons per source")
    table.add_column("refit: span error before -> after")
    for layer in plan["layers"]:
        merge = layer.get("merge")
        if merge and "sources" in merge:
            detail = ", ".join(f"L{s['covers'][0]}: {len(s['kv_groups'])}/{len(s['neurons'])}" for s in merge["sources"])
        elif len(layer["covers"]) > 1 and not merge:
            detail = "deletion" + (" + linear map" if "transform" in layer else "")
        else:  # kept layer, or a merge rule without channel selection (laco)
            detail = merge.get("rule", "merged") if merge else "-"
        refit = layer.get("refit")
        fit = "-"
        if refit:
            key = "held_out" if "held_out" in refit["error_after"] else "calibration"
            fit = f"{refit['error_before'][key]:.3f} -> {refit['error_after'][key]:.3f} ({key.replace('_', '-')})"
            fit += "" if refit.get("applied", True) else ", not applied"
        table.add_row(str(layer["index"]), ",".join(map(str, layer["covers"])), detail, fit)
    console = Console(stderr=True)
    console.print(table)
    console.print(
        f"layers {plan['original_layers']} -> {plan['final_layers']}, parameters "
        f"{plan['original_parameters']:,} -> {plan['final_parameters']:,} "
        f"({plan['removed_parameter_fraction']:.2%} removed), {plan['seconds']:.1f} s"
        + (f", written to {out_dir}" if out_dir else "")
    )


@app.command()
def compress(
    model: Optional[str] = typer.Argument(
        None, help="Local HF folder, .gguf file, or hub id (online). Default: embedded SmolLM2-135M-Instruct."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    ratio: Optional[float] = typer.Option(
        None, help="Fraction of all parameters to remove, in (0, 1); converted to a whole number of layers."
    ),
    target_layers: Optional[int] = typer.Option(None, help="Number of decoder layers to keep (instead of --ratio)."),
    method: str = typer.Option(DEFAULT_METHOD, help="Compression method; `come methods` lists them."),
    calib: str = typer.Option(default("calib"), help=help_text("calib")),
    nsamples: Optional[int] = typer.Option(None, min=1, help=help_text("nsamples")),
    seqlen: Optional[int] = typer.Option(None, min=2, help=help_text("seqlen")),
    seed: int = typer.Option(default("seed"), help=help_text("seed")),
    batch_size: int = typer.Option(default("batch_size"), min=1, help=help_text("batch_size")),
    merge_size: int = typer.Option(default("merge_size"), min=2, help=help_text("merge_size")),
    # None: the method's default (methods.register(defaults=...)), else options.py's.
    allow_remerge: Optional[bool] = typer.Option(None, help=help_text("allow_remerge")),
    protect_first: Optional[int] = typer.Option(None, min=0, help=help_text("protect_first")),
    norm: NormMode = typer.Option(default("norm"), help=help_text("norm")),
    output_norm: OutputNorm = typer.Option(default("output_norm"), help=help_text("output_norm")),
    sbi_tokens: SbiTokens = typer.Option(default("sbi_tokens"), help=help_text("sbi_tokens")),
    granularity: int = typer.Option(default("granularity"), min=1, help=help_text("granularity")),
    search_samples: Optional[int] = typer.Option(None, min=1, help=help_text("search_samples")),
    search_loss: Optional[SearchLoss] = typer.Option(None, help=help_text("search_loss")),
    refit: Optional[bool] = typer.Option(None, help=help_text("refit")),
    refit_damping: str = typer.Option(default("refit_damping"), help=help_text("refit_damping")),
    search_windows: int = typer.Option(default("search_windows"), min=0, help=help_text("search_windows")),
    search_deletions: int = typer.Option(default("search_deletions"), min=0, help=help_text("search_deletions")),
    search_deletion_rank: DeletionRank = typer.Option(default("search_deletion_rank"),
                                                      help=help_text("search_deletion_rank")),
    search_screen_samples: int = typer.Option(default("search_screen_samples"), min=1,
                                              help=help_text("search_screen_samples")),
    search_ratios: str = typer.Option(
        ",".join(f"{r:g}" for r in default("search_ratios")), help=help_text("search_ratios") + " Comma list in [0, 1].",
        show_default=False,
    ),
    drop_layers: str = typer.Option("", help=help_text("drop_layers") + " Comma list.", show_default=False),
    replaceme_objective: ReplacemeObjective = typer.Option(default("replaceme_objective"),
                                                           help=help_text("replaceme_objective")),
    replaceme_blocks: int = typer.Option(default("replaceme_blocks"), min=1, help=help_text("replaceme_blocks")),
    dtype: str = typer.Option("float32", help="Weight dtype: float32 | bfloat16 | float16."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto."),
    layerwise: bool = typer.Option(
        False, "--layerwise", help="Never hold the model: read one decoder layer at a time from MODEL's safetensors."
    ),
    activation_dtype: str = typer.Option(default("activation_dtype"), help=help_text("activation_dtype")),
    activation_storage: Storage = typer.Option(default("activation_storage"), help=help_text("activation_storage")),
    cache_dir: Optional[Path] = typer.Option(None, help=help_text("cache_dir")),
    max_shard_size: str = typer.Option("2GB", help="--layerwise: largest output safetensors shard."),
    save_dtype: Optional[str] = typer.Option(
        None, help="Dtype of the saved weights: float32 | bfloat16 | float16. Default: the source checkpoint's "
        "(a GGUF source: bfloat16), whatever --dtype computed in.",
    ),
    incremental: bool = typer.Option(default("incremental"), hidden=True, help=help_text("incremental")),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Compress MODEL to fewer layers and write a standard checkpoint to --out."""
    try:
        from .pipeline import compress as run_compress

        result = run_compress(
            model,
            ratio=ratio,
            target_layers=target_layers,
            method=method,
            out=out,
            overwrite=overwrite,
            dtype=dtype,
            device=device,
            layerwise=layerwise,
            max_shard_size=max_shard_size,
            save_dtype=save_dtype,
            activation_dtype=activation_dtype,
            activation_storage=activation_storage.value,
            cache_dir=str(cache_dir) if cache_dir else None,
            incremental=incremental,
            calib=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            batch_size=batch_size,
            merge_size=merge_size,
            allow_remerge=allow_remerge,
            protect_first=protect_first,
            norm=norm.value,
            output_norm=output_norm.value,
            sbi_tokens=sbi_tokens.value,
            granularity=granularity,
            search_samples=search_samples,
            search_loss=search_loss.value if search_loss is not None else None,
            refit=refit,
            refit_damping=refit_damping,
            search_windows=search_windows,
            search_deletions=search_deletions,
            search_deletion_rank=search_deletion_rank.value,
            search_screen_samples=search_screen_samples,
            search_ratios=tuple(_floats(search_ratios, "--search-ratios")),
            drop_layers=tuple(_ints(drop_layers, "--drop-layers")),
            replaceme_objective=replaceme_objective.value,
            replaceme_blocks=replaceme_blocks,
            progress=not quiet,
        )
    except _user_errors() as exc:
        _fail(str(exc))
    if not quiet:
        print_summary(result.plan, result.out_dir)


@app.command("eval")
def eval_command(
    model: Optional[str] = typer.Argument(None, help="Model folder, .gguf file or hub id. Default: embedded SmolLM2-135M."),
    ppl: str = typer.Option("wikipedia,lambada", help="Perplexity sources (comma list; 'none' to skip): wikipedia | lambada | file | HF dataset."),
    tasks: str = typer.Option("all", help=f"Zero-shot tasks: all ({','.join(PAPER_TASKS)}), a comma list, or none."),
    limit: Optional[int] = typer.Option(None, help="Documents per zero-shot task (quick runs); written into the results."),
    seqlen: int = typer.Option(512, min=2, help="Perplexity window length (non-overlapping windows)."),
    max_tokens: Optional[int] = typer.Option(None, help="Evaluate at most this many perplexity tokens per source."),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    speed: bool = typer.Option(False, help="Also measure prefill and decode tokens/s."),
    online: bool = typer.Option(False, help="Use lm-eval's standard hub tasks instead of the offline copies."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number, versions, seed and limit here."),
    update_card: bool = typer.Option(
        False, help="MODEL is a `come compress` folder: write the results, next to the dense model's under the same "
        "settings (cached), into its README.md (table + model-index metadata) and redraw come_plan.png.",
    ),
    reference: Optional[str] = typer.Option(
        None, help="Also report the mean per-token KL divergence from this model's next-token distribution, and top-1 "
        "agreement, on the perplexity windows. Default: the source model named in MODEL's come_plan.json, if any.",
    ),
    no_reference: bool = typer.Option(False, "--no-reference", help="Skip the KL / agreement comparison."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate a model: perplexity, KL to its source model, zero-shot accuracy (lm-evaluation-harness) and speed."""
    if update_card and (model is None or not (Path(model) / "come_plan.json").is_file()):
        _fail(f"--update-card needs a folder written by come compress; {model!r} has no come_plan.json")
    try:
        from .evaluate import evaluate, parse_list, print_report
        from .outputs import check_writable, write_json_atomic

        # Every file this command writes is checked before the evaluation, not after it.
        if json_path is not None:
            if json_path.is_dir():
                _fail(f"--json {json_path} is a folder; give a file path")
            check_writable(json_path.expanduser().resolve().parent, "--json")
        if update_card:
            check_writable(Path(model), "model card")

        result = evaluate(
            model,
            ppl_sources=parse_list(ppl, ("wikipedia", "lambada")),
            tasks=parse_list(tasks, PAPER_TASKS),
            limit=limit,
            seqlen=seqlen,
            max_tokens=max_tokens,
            batch_size=batch_size,
            seed=seed,
            speed=speed,
            offline=not online,
            dtype=dtype,
            device=device,
            progress=not quiet,
            reference=None if no_reference else (reference or "plan"),
        )
        if json_path is not None:
            write_json_atomic(json_path, result)
        if update_card:
            from .evaluate import update_card as write_results

            settings = {"ppl_sources": parse_list(ppl, ("wikipedia", "lambada")),
                        "tasks": parse_list(tasks, PAPER_TASKS), "limit": limit, "seqlen": seqlen,
                        "max_tokens": max_tokens, "batch_size": batch_size, "seed": seed, "offline": not online,
                        "dtype": dtype, "device": device}
            card = write_results(model, result, settings, progress=not quiet)
            typer.echo(f"model card updated: {card}", err=True)
    except _user_errors() as exc:
        _fail(str(exc))
    print_report(result)


def _floats(value: str, option: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        _fail(f"{option} takes comma-separated numbers, got {value!r}")


def _ints(value: str, option: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        _fail(f"{option} takes comma-separated whole numbers, got {value!r}")


def _method_options(items: list[str]) -> dict[str, dict]:
    import json

    from .options import CompressionOptions

    # seed and progress are shared by the whole grid (--seed, --quiet).
    known = set(CompressionOptions.__dataclass_fields__) - {"seed", "progress"}
    options: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            _fail(f"--set takes METHOD.OPTION=VALUE, got {item!r}")
        if name not in known:
            _fail(f"--set {item!r}: unknown option {name!r}; known: {', '.join(sorted(known))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(method, {})[name] = value
    return options


def _distill_options(items: list[str]) -> dict:
    import json

    from .distill import DistillOptions

    known = (set(DistillOptions.__dataclass_fields__) | {"tokens"}) - {"seed", "progress", "workers", "save_every"}
    options = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in known:
            _fail(f"--distill-set takes OPTION=VALUE with OPTION one of {', '.join(sorted(known))}; got {item!r}")
        try:
            options[name] = json.loads(raw)
        except json.JSONDecodeError:
            options[name] = raw
    return options


def _command_line(prefix: str, ctx: typer.Context) -> str:
    """The invocation, rebuilt from the parsed parameters (independent of how it was launched)."""
    import shlex

    parts = [prefix]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value == [] or param.name == "quiet":
            continue
        value = getattr(value, "value", value)
        if param.param_type_name == "argument":
            parts.append(shlex.quote(str(value)))
        elif isinstance(value, bool):
            parts.append(param.opts[0] if value else param.secondary_opts[0])
        elif isinstance(value, (list, tuple)):
            parts += [f"{param.opts[0]} {shlex.quote(str(v))}" for v in value]
        else:
            parts.append(f"{param.opts[0]} {shlex.quote(str(value))}")
    return " ".join(parts)


@app.command()
def bench(
    click_context: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model to compress. Default: embedded SmolLM2-135M."),
    out: Path = typer.Option(..., "--out", "-o", help="Results folder; finished cells found there are skipped."),
    methods: str = typer.Option("dense,come,shortgpt", help="Comma list of methods; 'dense' is the uncompressed reference. "
                                 "LABEL:METHOD is a variant (see --set); a trailing @0.2 (or @0.1/0.3) runs it at those ratios only."),
    ratios: str = typer.Option("0.1,0.2,0.3", help="Comma list of parameter fractions to remove."),
    ppl: str = typer.Option("wikipedia,lambada", help="Perplexity sources, or none."),
    tasks: str = typer.Option("all", help="Zero-shot tasks: all, a comma list, or none."),
    limit: Optional[int] = typer.Option(None, help="Documents per zero-shot task."),
    ppl_max_tokens: Optional[int] = typer.Option(None, help="Perplexity tokens per source (default: all)."),
    seqlen: int = typer.Option(512, min=2, help="Perplexity window and calibration sequence length (every method; --set METHOD.seqlen=N for one)."),
    nsamples: int = typer.Option(default("nsamples"), min=1, help="Calibration sequences, the same for every method "
                                 "(a method's own default applies only through --set METHOD.nsamples=N)."),
    search_samples: Optional[int] = typer.Option(None, min=1, help=help_text("search_samples")),
    granularity: int = typer.Option(default("granularity"), min=1, help=help_text("granularity")),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    keep_models: bool = typer.Option(False, help="Keep compressed checkpoints (default: delete after evaluation)."),
    set_option: list[str] = typer.Option(
        [], "--set", help="Per-method compress option, METHOD.OPTION=VALUE (e.g. laco.merge_size=4); repeatable. "
        "A method entry LABEL:METHOD in --methods is a variant of METHOD configured by --set LABEL.OPTION=VALUE.",
    ),
    distill_methods: str = typer.Option(
        "", "--distill", help="Comma list of --methods labels to also distil (a LABEL+distill cell per ratio)."
    ),
    distill_set: list[str] = typer.Option(
        [], "--distill-set", help="Distillation option for every --distill cell, OPTION=VALUE (e.g. tokens=131072, "
        "global_steps=16, batch_size=4); repeatable. See `come distill --help`.",
    ),
    report_only: bool = typer.Option(
        False, "--report-only", help="Compute nothing: write the tables from the cells already finished "
        "(a partial table names the cells not run yet)."),
    fill_kl: bool = typer.Option(
        False, "--fill-kl", help="Finished cells scored before KL to the dense model was measured: rebuild their "
        "model (checked to give the recorded plan and perplexity) and add KL and top-1 agreement, without rerunning "
        "the tasks."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Compress and evaluate every (method, ratio) cell; write results.md, results.csv and results.png."""
    try:
        from .bench import run_bench
        from .evaluate import parse_list

        rows = run_bench(
            model,
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            ratios=_floats(ratios, "--ratios"),
            out=out,
            ppl_sources=parse_list(ppl, ("wikipedia", "lambada")),
            tasks=parse_list(tasks, PAPER_TASKS),
            limit=limit,
            ppl_max_tokens=ppl_max_tokens,
            seqlen=seqlen,
            batch_size=batch_size,
            seed=seed,
            keep_models=keep_models,
            compress_options={
                "nsamples": nsamples, "seqlen": seqlen, "search_samples": search_samples, "granularity": granularity,
            },
            method_options=_method_options(set_option),
            distill_methods=[m.strip() for m in distill_methods.split(",") if m.strip()],
            distill_options=_distill_options(distill_set),
            progress=not quiet,
            report_only=report_only,
            fill_kl=fill_kl,
            command=_command_line("come bench", click_context),
        )
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"{len(rows)} cells; results in {out}")


@app.command("export-gguf")
def export_gguf_command(
    model: Path = typer.Argument(..., help="A model folder (e.g. written by come compress or come distill)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .gguf file to write (atomically)."),
    type_: str = typer.Option("f16", "--type", help="Matrix type: f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0."),
    overwrite: bool = typer.Option(False, help="Replace an existing file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write MODEL as a GGUF file for llama.cpp / ollama (Llama, Mistral, Qwen2, Qwen3 and Gemma 3 families)."""
    try:
        from .gguf_export import export_gguf

        path = export_gguf(model, out, type_, overwrite=overwrite, progress=not quiet)
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {type_})")


@app.command("run")
def run_command(
    recipe: Path = typer.Argument(..., help="A recipe YAML (see recipes/ and `come run --help`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder; overrides the recipe's `out`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a recipe: compress -> (distill) -> (eval), each stage skipped when its recorded settings match.

    The recipe is validated before any work; a run killed in the middle continues at the stage that
    did not finish when run again.
    """
    try:
        from .recipe import run_recipe

        outputs = run_recipe(recipe, out=str(out) if out else None, progress=not quiet,
                             log=lambda message: typer.echo(message, err=True))
    except _user_errors() as exc:
        _fail(str(exc))
    for stage, path in outputs.items():
        typer.echo(f"{stage}: {path}")


@app.command()
def methods() -> None:
    """List the compression methods."""
    from .methods import available_methods

    for name, description in available_methods().items():
        typer.echo(f"{name:12s} {description}")


@app.command("distill")
def distill_command(
    compressed: Path = typer.Argument(..., help="Folder written by `come compress` (the student)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically; work state in OUT.partial/)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model. Default: the original model named in come_plan.json."),
    data: str = typer.Option("wikipedia", help="Training text (calib split): wikipedia | lambada | a .txt/.jsonl/.parquet file | HF dataset | a mixture A+B."),
    tokens: int = typer.Option(262_144, min=1, help="Training tokens drawn from --data (stage 2 makes one pass over them unless --global-steps; stage 1 trains each layer on them)."),
    seqlen: int = typer.Option(512, min=2, help="Tokens per training sequence."),
    epochs: int = typer.Option(1, min=1, help="Stage-1 passes over the tokens."),
    layers: str = typer.Option("none", help="Stage-1 (per-layer, teacher-forced) layers: none (the default: end to end only) | merged (stand for >1 original layer) | all."),
    loss: str = typer.Option("mse", help="Stage-1 loss: mse (normalised) | cosine | kl (through the teacher's final norm and head)."),
    lr: float = typer.Option(1e-4, help="Stage-1 peak learning rate."),
    cache_dtype: str = typer.Option("bfloat16", help="Teacher hidden-state cache on disk: float32 | bfloat16 | float16."),
    global_steps: Optional[int] = typer.Option(None, min=0, help="Stage-2 (end-to-end logit KD) optimizer steps. Default: one pass over "
                                               "--tokens; 0 skips stage 2."),
    global_lr: float = typer.Option(1e-3, help="Stage-2 peak learning rate (the default suits --lora adapters)."),
    temperature: float = typer.Option(1.0, help="KD temperature."),
    hidden_weight: float = typer.Option(0.0, help="Stage-2 weight of the hidden-state alignment loss (0: logit KD alone)."),
    train: str = typer.Option("all", help="Stage-2 trainable layers: merged | neighbours (merged and the layers next to them) | all."),
    lora: int = typer.Option(16, min=0, help="Stage 2: train rank-R LoRA adapters (PEFT) on the trainable layers' linear maps "
                             "instead of their weights; merged into the weights at the end (a standard checkpoint). 0: train the weights themselves (then use --global-lr near 1e-4)."),
    lora_alpha: float = typer.Option(0.0, min=0.0, help="LoRA alpha (scale alpha/R); 0 means 2 x R."),
    heldout_tokens: int = typer.Option(4096, min=1, help="Held-out tokens (whole windows of --seqlen, never trained on) on which "
                                       "the KL to the teacher judges every candidate; the output is the best one, the input itself "
                                       "if training did not lower it."),
    heldout_data: Optional[str] = typer.Option(None, help="Held-out text for that check. Default: --data, windows disjoint from training."),
    eval_every: int = typer.Option(50, min=0, help="Stage-2 steps between held-out checks (0: only at the end)."),
    gradient_checkpointing: bool = typer.Option(False, help="Stage 2: recompute activations in backward to save memory."),
    fsdp: bool = typer.Option(False, help="Stage 2, --workers >= 2 or torchrun: shard the student (FSDP2) instead of DDP, for models too big for one device."),
    warmup: float = typer.Option(0.05, help="Warm-up fraction of the steps (then cosine decay)."),
    batch_size: int = typer.Option(2, min=1, help="Sequences per micro-batch (and per teacher-cache chunk)."),
    grad_accum: int = typer.Option(1, min=1, help="Micro-batches per optimizer step."),
    weight_decay: float = typer.Option(0.0),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping; 0 disables it."),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("float32", help="Weight dtype: float32 | bfloat16 | float16."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto."),
    workers: int = typer.Option(1, min=1, help="Processes (torch.distributed: gloo on CPU, nccl on GPU); ignored under torchrun."),
    save_every: int = typer.Option(50, min=1, help="Checkpoint every this many optimizer steps."),
    resume: bool = typer.Option(False, help="Continue the unfinished run in OUT.partial/ from its last checkpoints."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder and discard an unfinished run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Distil a compressed model from its original: per-layer (stage 1), then optionally end to end (stage 2)."""
    try:
        from .distill import distill

        summary = distill(
            compressed, out, teacher=teacher, data=data, tokens=tokens, resume=resume, overwrite=overwrite,
            seqlen=seqlen, epochs=epochs, layers=layers, loss=loss, lr=lr, cache_dtype=cache_dtype,
            global_steps=global_steps, global_lr=global_lr, temperature=temperature, hidden_weight=hidden_weight,
            train=train, lora=lora, lora_alpha=lora_alpha, heldout_tokens=heldout_tokens, heldout_data=heldout_data,
            eval_every=eval_every, gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, warmup=warmup, batch_size=batch_size,
            grad_accum=grad_accum, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, dtype=dtype,
            device=device, workers=workers, save_every=save_every, progress=not quiet,
        )
    except _user_errors() as exc:
        _fail(str(exc))
    if quiet or not summary:  # ranks other than 0 under torchrun return nothing
        return
    for k, layer in (summary["stage1"] or {}).get("layers", {}).items():
        typer.echo(f"stage 1 layer {k} (original {layer['covers'][0]}-{layer['covers'][-1]}): "
                   f"loss {layer['initial_loss']:.4g} -> {layer['final_loss']:.4g} in {layer['steps']} steps", err=True)
    if summary["stage2"]:
        s2 = summary["stage2"]
        typer.echo(f"stage 2: KD loss {s2['initial_loss']:.4g} -> {s2['final_loss']:.4g} in {s2['steps']} steps", err=True)
    sel = summary["selection"]
    kept = {"input": "the input model, unchanged", "stage1": "the stage-1 result",
            "stage2": f"stage 2 at step {(sel['candidates'].get('stage2') or {}).get('step')}"}[sel["chosen"]]
    first, best = sel["candidates"]["input"], sel["candidates"][sel["chosen"]]
    verdict = (f"held-out KL to the teacher {first['kl']:.4f} -> {best['kl']:.4f} nats/token, top-1 agreement "
               f"{first['top1']:.1%} -> {best['top1']:.1%} ({sel['heldout']['tokens']} held-out tokens): kept {kept}")
    if not sel["improved"]:
        verdict = (f"training did not lower the held-out KL to the teacher ({first['kl']:.4f} nats/token): "
                   "the output is the input model, unchanged")
    typer.echo(verdict, err=True)
    typer.echo(f"{summary['seconds']:.1f} s, written to {summary['out']}", err=True)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
