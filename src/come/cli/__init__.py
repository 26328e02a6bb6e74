"""Command-line interface: `come compress | eval | distill | bench | methods`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..distill.options import DEFAULT_TOKENS, TOKENS_HELP  # light: the training code is imported on first use
from ..evaluation.tasks import PAPER_TASKS  # light: lm-eval is imported only when tasks run
from ..methods import DEFAULT_METHOD  # light: the method modules are imported on first use

MODEL_HELP = ("A model folder, .gguf file, hub id (online) or built-in name: smollm2-135m (SmolLM2-135M-Instruct, "
              "the default) | gemma3-270m.")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Make causal LMs shallower by merging adjacent decoder layers (CoMe) and compare against baselines.",
    pretty_exceptions_enable=False,
)


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


# -- flags generated from the option definitions (engine/options.py, methods/catalog.py, distill/options.py) --------
def _shown(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _method_note(option) -> str:
    """' Default: the method's (A: x; others: y).' when some method has its own default for `option`."""
    from ..methods import specs

    by_value: dict = {}
    for spec in specs():
        if option.name in spec.defaults:
            by_value.setdefault(_shown(spec.defaults[option.name]), []).append(spec.name)
    if not by_value:
        return ""
    parts = [f"{', '.join(names)}: {value}" for value, names in by_value.items()]
    other = option.unset if option.default is None and option.unset else _shown(option.default)
    return f" Default: the method's ({'; '.join(parts)}; others: {other})."


def _flag(option, *, compression: bool = True, given_only: bool = False, help_prefix: str = "", help_suffix: str = "",
          panel: str | None = None):
    """(name, annotation, typer.Option, converter) of one option's flag. Its default is the option's, or None
    ("not given") when a method has its own default (a compression option) or `given_only`; the converter turns
    the flag's value into the option's (enum members to strings, comma lists to tuples)."""
    from enum import Enum
    from typing import get_args

    from ..engine.options import choice_enum

    note = _method_note(option) if compression else ""
    unset = given_only or bool(note) or option.default is None
    kind, convert, extra = option.type, (lambda value: value), {}
    help_text = help_prefix + option.help
    if option.choices is not None:
        kind = choice_enum(option)
        convert = lambda value: value.value if isinstance(value, Enum) else value
    elif option.element is not None:  # a comma list
        parse = _floats if option.element is float else _ints
        bounds = f" in [{option.min:g}, {option.max:g}]" if option.min is not None and option.max is not None else ""
        kind, help_text = str, help_text + f" Comma list{bounds}."
        convert = lambda value: None if value is None else tuple(parse(value, option.flag))
        extra["show_default"] = bool(option.default) and not unset
    elif option.type == (str | float):
        kind = str
    elif type(None) in get_args(option.type):
        kind = next(t for t in get_args(option.type) if t is not type(None))
    if option.element is None:
        extra.update({k: v for k, v in (("min", option.min), ("max", option.max)) if v is not None})
    default = None if unset else (_shown(option.default) if option.element is not None else option.default)
    info = typer.Option(default, help=help_text + note + help_suffix, hidden=option.hidden,
                        rich_help_panel=panel, **extra)
    return option.name, Optional[kind] if default is None else kind, info, convert


def _with_flags(into: str, flags: list):
    """Decorator: the command gets one parameter per flag (from `_flag`) where its parameter `into` stands, and
    receives their converted values as one dict `into`, so no option is spelled twice."""
    import functools
    import inspect
    import typing

    def wrap(fn):
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn)
        params = []
        for p in signature.parameters.values():
            if p.name == into:
                params += [inspect.Parameter(name, p.kind, default=info, annotation=annotation)
                           for name, annotation, info, _ in flags]
            else:
                params.append(p.replace(annotation=hints.get(p.name, p.annotation)))
        converters = {name: convert for name, _, _, convert in flags}

        @functools.wraps(fn)
        def command(**kwargs):
            values = {name: convert(kwargs.pop(name)) for name, convert in converters.items()}
            return fn(**kwargs, **{into: values})

        del command.__wrapped__  # typer reads the signature below, not fn's
        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


def _compression_flags() -> list:
    """Every compression option's flag: the shared ones, then each method's own, in a help panel each."""
    from ..engine.options import SHARED
    from ..methods import specs

    flags = [_flag(o, panel="Compression options (every method)") for o in SHARED if o.cli]
    for spec in specs():
        flags += [_flag(o, help_prefix=f"{spec.name}: ", panel=f"{spec.name} options") for o in spec.options if o.cli]
    return flags


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _user_errors():
    from ..errors import ComeError
    from ..evaluation.data import DataError

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
@_with_flags("options", _compression_flags())
def compress(
    model: Optional[str] = typer.Argument(
        None, help=MODEL_HELP
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    ratio: Optional[float] = typer.Option(
        None, help="Fraction of all parameters to remove, in (0, 1); converted to a whole number of layers."
    ),
    target_layers: Optional[int] = typer.Option(None, help="Number of decoder layers to keep (instead of --ratio)."),
    method: str = typer.Option(DEFAULT_METHOD, help="Compression method; `come methods` lists them."),
    dtype: str = typer.Option("float32", help="Compute dtype: float32 | bfloat16 | float16 (the saved weights' dtype: --save-dtype)."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto."),
    layerwise: bool = typer.Option(
        False, "--layerwise", help="Never hold the model: read one decoder layer at a time from MODEL's safetensors."
    ),
    max_shard_size: str = typer.Option("2GB", help="--layerwise: largest output safetensors shard."),
    save_dtype: Optional[str] = typer.Option(
        None, help="Dtype of the saved weights: float32 | bfloat16 | float16. Default: the source checkpoint's "
        "(a GGUF source: bfloat16), whatever --dtype computed in.",
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
    options: Optional[dict] = None,  # every compression option's flag (engine/options.py, methods/catalog.py)
) -> None:
    """Compress MODEL to fewer layers and write a standard checkpoint to --out."""
    try:
        from ..engine.pipeline import compress as run_compress

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
            progress=not quiet,
            **options,
        )
    except _user_errors() as exc:
        _fail(str(exc))
    if not quiet:
        print_summary(result.plan, result.out_dir)


@app.command("eval")
def eval_command(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
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
        from ..evaluation.evaluate import evaluate, parse_list, print_report
        from ..outputs import check_output_file, check_writable, write_json_atomic

        # Every file this command writes is checked before the evaluation, not after it.
        if json_path is not None:
            check_output_file(json_path, what="--json")
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
            from ..evaluation.evaluate import update_card as write_results

            settings = {"ppl_sources": parse_list(ppl, ("wikipedia", "lambada")),
                        "tasks": parse_list(tasks, PAPER_TASKS), "limit": limit, "seqlen": seqlen,
                        "max_tokens": max_tokens, "batch_size": batch_size, "seed": seed, "offline": not online,
                        "dtype": dtype, "device": device}
            card = write_results(model, result, settings, progress=not quiet)
            typer.echo(f"model card updated: {card}", err=True)
    except _user_errors() as exc:
        _fail(str(exc))
    print_report(result)


def _method_options(items: list[str]) -> dict[str, dict]:
    import json

    from ..engine.options import all_options
    from .bench import GRID_OPTIONS

    known = set(all_options()) - set(GRID_OPTIONS)  # seed and progress are the whole grid's (--seed, --quiet)
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

    from ..distill.options import DistillOptions
    from .bench import DISTILL_RUN_CONTROL

    known = (set(DistillOptions.__dataclass_fields__) | {"tokens"}) - set(DISTILL_RUN_CONTROL)
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


# Options `come bench` takes for every method at once; not given, each method keeps its own default.
_BENCH_WIDE = ("nsamples", "search_samples", "granularity")
PPL_SEQLEN = 512


def _bench_flags() -> list:
    from ..engine.options import all_options, owner

    return [_flag(all_options()[name], given_only=True, help_prefix=f"{owner(name)}: " if owner(name) else "",
                  help_suffix=" Given, the same for every method that has it "
                  "(--set METHOD.OPTION=VALUE for one).") for name in _BENCH_WIDE]


@app.command()
@_with_flags("options", _bench_flags())
def bench(
    click_context: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model to compress: " + MODEL_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder; finished cells found there are "
                                       "skipped. Required unless --definition names one."),
    definition: Optional[Path] = typer.Option(
        None, help="A benchmark definition (YAML, e.g. bench/smollm2_methods.yaml): the grid (model, methods and "
        "their options, ratios, evaluation, distillation) instead of the flags that set it; --out, --keep-models, "
        "--report-only, --fill-kl and --quiet still apply.",
    ),
    methods: str = typer.Option("dense,come,shortgpt", help="Comma list of methods; 'dense' is the uncompressed reference. "
                                 "LABEL:METHOD is a variant (see --set); a trailing @0.2 (or @0.1/0.3) runs it at those ratios only."),
    ratios: str = typer.Option("0.1,0.2,0.3", help="Comma list of parameter fractions to remove."),
    ppl: str = typer.Option("wikipedia,lambada", help="Perplexity sources, or none."),
    tasks: str = typer.Option("all", help="Zero-shot tasks: all, a comma list, or none."),
    limit: Optional[int] = typer.Option(None, help="Documents per zero-shot task."),
    ppl_max_tokens: Optional[int] = typer.Option(None, help="Perplexity tokens per source (default: all)."),
    seqlen: Optional[int] = typer.Option(
        None, min=2, help=f"Perplexity window length ({PPL_SEQLEN} when not given). Given, also every method's "
        "calibration sequence length (otherwise each method's own; --set METHOD.seqlen=N for one).",
    ),
    options: Optional[dict] = None,  # calibration options given for every method (_BENCH_WIDE)
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
        from ..evaluation.evaluate import parse_list
        from .bench import load_definition, run_bench

        if definition is not None:
            run_controls = {"definition", "out", "keep_models", "report_only", "fill_kl", "quiet"}
            given = [p.opts[0] for p in click_context.command.params if p.name not in run_controls
                     and getattr(click_context.get_parameter_source(p.name), "name", "") == "COMMANDLINE"]
            if given:
                _fail(f"--definition sets the grid; give {', '.join(given)} in {definition}, not on the command line")
            grid = load_definition(definition)
            out = out or grid["out"]
            del grid["out"]
        else:
            if out is None:
                _fail("give --out (or a --definition that names the results folder)")
            grid = {
                "model": model,
                "methods": [m.strip() for m in methods.split(",") if m.strip()],
                "ratios": _floats(ratios, "--ratios"),
                "ppl_sources": parse_list(ppl, ("wikipedia", "lambada")),
                "tasks": parse_list(tasks, PAPER_TASKS),
                "limit": limit,
                "ppl_max_tokens": ppl_max_tokens,
                "seqlen": seqlen or PPL_SEQLEN,
                "batch_size": batch_size,
                "seed": seed,
                "compress_options": {k: v for k, v in {**options, "seqlen": seqlen}.items() if v is not None},
                "method_options": _method_options(set_option),
                "distill_methods": [m.strip() for m in distill_methods.split(",") if m.strip()],
                "distill_options": _distill_options(distill_set),
            }
        rows = run_bench(
            **grid,
            out=out,
            keep_models=keep_models,
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
        from ..artifacts.gguf_export import export_gguf

        path = export_gguf(model, out, type_, overwrite=overwrite, progress=not quiet)
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {type_})")


@app.command("run")
def run_command(
    recipe: Path = typer.Argument(..., help="A recipe YAML (examples in recipes/; every key in docs/usage.md)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder; overrides the recipe's `out`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a recipe: compress -> (distill) -> (eval) -> (GGUF export), each stage skipped when its recorded
    settings match.

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
    from ..methods import available_methods

    for name, description in available_methods().items():
        typer.echo(f"{name:12s} {description}")


def _distill_flags() -> list:
    from ..distill.options import DistillOptions
    from ..engine.options import options_of

    return [_flag(o, compression=False) for o in options_of(DistillOptions) if o.cli]


@app.command("distill")
@_with_flags("options", _distill_flags())
def distill_command(
    compressed: Path = typer.Argument(..., help="Folder written by `come compress` (the student)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically; work state in OUT.partial/)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model. Default: the original model named in come_plan.json."),
    tokens: int = typer.Option(DEFAULT_TOKENS, min=1, help=TOKENS_HELP),
    options: Optional[dict] = None,  # every DistillOptions field's flag (distill/options.py)
    resume: bool = typer.Option(False, help="Continue the unfinished run in OUT.partial/ from its last checkpoints."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder and discard an unfinished run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Distil a compressed model from its original: end to end (stage 2) by default; per-layer first (stage 1) with --layers."""
    try:
        from ..distill import distill

        summary = distill(compressed, out, teacher=teacher, tokens=tokens, resume=resume, overwrite=overwrite,
                          progress=not quiet, **options)
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
        if s2.get("time_budget"):
            b = s2["time_budget"]
            typer.echo(f"stage 2: {b['steps']} steps fit in --time-budget {b['minutes']:g} min ({b['step_seconds']:.2f} s "
                       f"a step, {b['passes']:g} passes over the training windows; --global-steps {b['steps']} repeats it)",
                       err=True)
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
    from ..engine.allocator import keep_freed_memory

    keep_freed_memory()  # one command, one process: reuse freed blocks instead of faulting in new ones
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
