"""Command-line interface: `come compress | methods` (and more as they land)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .tasks import PAPER_TASKS  # light: lm-eval is imported only when tasks run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Make causal LMs shallower by merging adjacent decoder layers (CoMe) and compare against baselines.",
    pretty_exceptions_enable=False,
)


class NormMode(str, Enum):
    fold = "fold"
    mean = "mean"


class SbiTokens(str, Enum):
    last = "last"
    all = "all"


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
    for layer in plan["layers"]:
        merge = layer.get("merge")
        detail = (
            ", ".join(f"L{s['covers'][0]}: {len(s['kv_groups'])}/{len(s['neurons'])}" for s in merge["sources"])
            if merge
            else "-"
        )
        table.add_row(str(layer["index"]), ",".join(map(str, layer["covers"])), detail)
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
    method: str = typer.Option("come", help="Compression method; `come methods` lists them."),
    calib: str = typer.Option(
        "wikipedia", help="Calibration text: wikipedia | lambada | a .txt/.jsonl/.parquet file | HF dataset (online)."
    ),
    nsamples: int = typer.Option(32, min=1, help="Calibration sequences."),
    seqlen: int = typer.Option(512, min=2, help="Tokens per calibration sequence."),
    seed: int = typer.Option(0, help="Seed for calibration sampling."),
    batch_size: int = typer.Option(8, min=1, help="Sequences per forward pass during calibration."),
    merge_size: int = typer.Option(2, min=2, help="Adjacent layers merged per step."),
    allow_remerge: bool = typer.Option(False, help="Allow windows that contain an already merged layer."),
    norm: NormMode = typer.Option(NormMode.fold, help="RMSNorm gains: fold into the maps they feed (exact) or mean."),
    sbi_tokens: SbiTokens = typer.Option(SbiTokens.last, help="Tokens used for window distance: last or all."),
    granularity: int = typer.Option(20, min=1, help="come-p: channel-ratio grid steps (G+1 candidates per merge)."),
    search_samples: Optional[int] = typer.Option(
        None, min=1, help="Calibration sequences used by loss/similarity searches (come-p, sleb, laco); default all."
    ),
    dtype: str = typer.Option("float32", help="Weight dtype: float32 | bfloat16 | float16."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto."),
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
            calib=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            batch_size=batch_size,
            merge_size=merge_size,
            allow_remerge=allow_remerge,
            norm=norm.value,
            sbi_tokens=sbi_tokens.value,
            granularity=granularity,
            search_samples=search_samples,
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
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate a model: perplexity, zero-shot accuracy (lm-evaluation-harness) and speed."""
    try:
        from .evaluate import evaluate, parse_list, print_report
        from .export import write_json_atomic

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
        )
        if json_path is not None:
            write_json_atomic(json_path, result)
    except _user_errors() as exc:
        _fail(str(exc))
    print_report(result)


@app.command()
def methods() -> None:
    """List the compression methods."""
    from .methods import available_methods

    for name, description in available_methods().items():
        typer.echo(f"{name:12s} {description}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
