"""`come bench`: compress + evaluate a grid of (method, ratio) cells, resumably, into one table and plot."""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path
from typing import NamedTuple

from ..errors import ComeError
from ..outputs import atomic_file, atomic_write_text, check_writable, write_json_atomic

DENSE = "dense"
DISTILLED = "+distill"
FILL_GROUP = 4  # --fill-kl: rebuilt models evaluated together, sharing the dense model's pass
BENCH_STAMP = "bench_settings.json"  # written into a kept model: the settings it was compressed with
# Set for the whole grid (--seed, --quiet), not per cell.
GRID_OPTIONS = ("seed", "progress")
DISTILL_RUN_CONTROL = ("seed", "progress", "workers", "save_every")


def cell_name(method: str, ratio: float) -> str:
    return DENSE if method == DENSE else f"{method}-r{ratio:g}"


class MethodSpec(NamedTuple):
    label: str  # the cell name's stem, and the key of --set LABEL.OPTION=VALUE
    method: str  # the registered method it runs
    ratios: frozenset[float] | None  # the ratios it runs at (None: every ratio)


def parse_method_spec(spec: str) -> MethodSpec:
    """'LABEL:METHOD@R1/R2' -> (label, method, ratios). ':METHOD' makes a variant of METHOD configured by
    --set LABEL.OPTION=VALUE (without it, the label is the method); '@R1/R2' limits the entry to those
    ratios, for a variant that only makes sense at some, e.g. `drop` replaying another method's layers."""
    import re

    head, at, ratio_list = spec.partition("@")
    label, sep, method = head.partition(":")
    method = method if sep else label
    if not re.fullmatch(r"[A-Za-z0-9+_-]+", label):
        raise ComeError(f"method label {label!r} may hold letters, digits, +, _ and - only")
    ratios = None
    if at:
        try:
            ratios = frozenset(float(r) for r in ratio_list.split("/") if r.strip())
        except ValueError:
            raise ComeError(f"{spec!r}: the ratios after @ must be numbers separated by /") from None
    return MethodSpec(label, method, ratios)


def cell_options(method: str, given: dict) -> dict:
    """The options a cell of `method` runs with: every option the method reads, resolved (given over the
    method's defaults over the global ones); the seed is the grid's. A cell is keyed by these, so a changed
    default makes the cells it affects run again, and only those."""
    from ..engine.options import resolved_for

    unknown = sorted(set(given) & set(GRID_OPTIONS))
    if unknown:
        raise ComeError(f"{', '.join(unknown)}: set for the whole grid (--seed, --quiet), not per method")
    options = resolved_for(method, given)
    return {k: v for k, v in options.items() if k not in GRID_OPTIONS}


def distill_settings(given: dict) -> dict:
    """The distillation options a +distill cell runs with: `given` over DistillOptions' defaults (the grid's
    seed and the run controls, which do not change the result, left out)."""
    import dataclasses
    import json

    from ..distill.options import DEFAULT_TOKENS, DistillOptions, _check_options

    given = dict(given)
    tokens = given.pop("tokens", DEFAULT_TOKENS)
    try:
        options = DistillOptions(**given)
    except TypeError as exc:
        raise ComeError(f"--distill-set: {exc}") from None
    _check_options(options)
    options = dataclasses.asdict(options)
    resolved = {k: v for k, v in options.items() if k not in DISTILL_RUN_CONTROL}
    return json.loads(json.dumps({"tokens": tokens, **resolved}))


# Distillation options added after cells were made, with the value that reproduces what those cells ran:
# stage 2 in float32 (the default is now bfloat16 autocast where the device has it natively).
DISTILL_BEFORE = {"autocast": "off"}
# Compression options added after cells were made, likewise: come-search scored every candidate on all its
# scored sequences before its finalists screen, and in float32 before its candidate losses' and layer passes' autocast.
COMPRESS_BEFORE = {"search_finalists": 0, "search_finalist_samples": 4, "search_autocast": "off", "autocast": "off"}


def _compress_before(method: str, options: dict) -> dict:
    """`options` (a cell's resolved options) with the COMPRESS_BEFORE value of every option `method` reads
    that they lack: the cell was made before that option existed."""
    from ..core.option_defs import SHARED_NAMES
    from ..methods import get_spec

    reads = {o.name for o in get_spec(method).options} | SHARED_NAMES
    return {**{k: v for k, v in COMPRESS_BEFORE.items() if k in reads}, **options}


def migrate_settings(settings: dict, label: str) -> dict:
    """A cell's settings as `come bench` wrote them before cells were keyed by resolved options, in today's form.

    Those cells recorded the user's overrides: `compress_options` given for every method (None: not given)
    and `method_options` for the cell's own label, plus `base_method` for a variant and `distill` for a
    distilled cell. They resolve now as they did when the cell ran, provided no default the cell relied on
    changed since (the old key could not tell; such cells were relabelled or pinned by hand). Settings in
    today's form are returned unchanged."""
    if "compress_options" not in settings:  # resolved before an option existed: that option's behaviour then
        settings = dict(settings)
        if "options" in settings:
            settings["options"] = _compress_before(settings["method"], settings["options"])
        if "distill" in settings:
            settings["distill"] = {**distill_settings(DISTILL_BEFORE), **settings["distill"]}
        return settings
    old = dict(settings)
    bench_wide = {k: v for k, v in (old.pop("compress_options") or {}).items() if v is not None}
    own = old.pop("method_options") or {}
    base = old.pop("base_method", None)
    distill = old.pop("distill", None)
    method = label.removesuffix(DISTILLED)
    if method != DENSE:
        old["method"] = base or method
        old["options"] = cell_options(old["method"], {**_compress_before(old["method"], {}), **bench_wide, **own})
    if distill is not None:
        old["distill"] = distill_settings({**DISTILL_BEFORE, **distill})
    return old


def load_definition(path: str | Path) -> dict:
    """A benchmark definition (bench/*.yaml), validated as a whole before any work, as `run_bench` arguments.

        model: gemma3-270m            # optional: the default model
        out: bench/results/gemma3     # the results folder (--out overrides it)
        ratios: [0.1, 0.05]
        ppl: [wikipedia, lambada]     # perplexity sources (default), or none
        tasks: all                    # all (default) | none | a list
        limit: 300                    # documents per task (default: all)
        ppl_max_tokens: 32768         # (default: all)
        seqlen: 512                   # perplexity window (default 512)
        options: {}                   # compression options for every method (default: each method's own)
        methods:                      # label: entry; the label is the method unless `method` says otherwise
          dense:                      # the uncompressed reference
          come-search:
          come-paper: {method: come, options: {allow_remerge: false}}
          sleb: {ratios: [0.1]}       # only at these ratios
        distill:                      # optional: a LABEL+distill cell per ratio of these labels
          methods: [come-search]
          options: {tokens: 131072}   # `come distill` options, the same for every label

    Options are checked against their definitions (engine/options.py, methods/catalog.py, DistillOptions), as
    recipes and --set are."""
    import yaml
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    from ..engine.options import validated

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Entry(Strict):
        method: str | None = None
        ratios: list[float] | None = None
        options: dict = Field(default_factory=dict)

    class Distill(Strict):
        methods: list[str]
        options: dict = Field(default_factory=dict)

    class Definition(Strict):
        model: str | None = None
        out: str
        ratios: list[float]
        ppl: list[str] | str = "wikipedia,lambada"
        tasks: list[str] | str = "all"
        limit: int | None = Field(None, ge=1)
        ppl_max_tokens: int | None = Field(None, ge=2)
        seqlen: int = Field(512, ge=2)
        batch_size: int = Field(8, ge=1)
        seed: int = 0
        options: dict = Field(default_factory=dict)
        methods: dict[str, Entry | None]
        distill: Distill | None = None

    path = Path(path)
    if not path.is_file():
        raise ComeError(f"no such benchmark definition: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
        definition = Definition.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ComeError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except ValidationError as exc:
        parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ComeError(f"{path}: {'; '.join(parts)}") from None
    from ..evaluation.evaluate import parse_list
    from ..evaluation.tasks import PAPER_TASKS

    def as_list(value, everything):
        return parse_list(",".join(value) if isinstance(value, list) else value, everything)

    specs, method_options = [], {}
    for label, entry in definition.methods.items():
        entry = entry or Entry()
        ratios = "/".join(f"{r:g}" for r in entry.ratios) if entry.ratios else ""
        specs.append(f"{label}:{entry.method or label}" + (f"@{ratios}" if ratios else ""))
        if entry.options:
            try:
                method_options[label] = validated(entry.options, f"methods.{label}.options")
            except ComeError as exc:
                raise ComeError(f"{path}: {exc}") from None
    try:
        grid_wide = validated(definition.options, "options")
    except ComeError as exc:
        raise ComeError(f"{path}: {exc}") from None
    distill = definition.distill or Distill(methods=[])
    if distill.options:
        from .recipe import _distill_options_model

        try:
            _distill_options_model().model_validate(distill.options)
        except ValidationError as exc:
            parts = [f"distill.options.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
            raise ComeError(f"{path}: {'; '.join(parts)}") from None
    return {
        "model": definition.model, "methods": specs, "ratios": definition.ratios, "out": Path(definition.out),
        "ppl_sources": as_list(definition.ppl, ("wikipedia", "lambada")), "tasks": as_list(definition.tasks, PAPER_TASKS),
        "limit": definition.limit, "ppl_max_tokens": definition.ppl_max_tokens, "seqlen": definition.seqlen,
        "batch_size": definition.batch_size, "seed": definition.seed, "compress_options": grid_wide,
        "method_options": method_options, "distill_methods": distill.methods, "distill_options": distill.options,
    }


def run_bench(
    model: str | None,
    methods: list[str],
    ratios: list[float],
    out: Path,
    ppl_sources: list[str],
    tasks: list[str],
    limit: int | None = None,
    ppl_max_tokens: int | None = None,
    seqlen: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    keep_models: bool = False,
    compress_options: dict | None = None,
    method_options: dict[str, dict] | None = None,
    distill_methods: list[str] | None = None,
    distill_options: dict | None = None,
    save_dtype: str = "float32",
    progress: bool = True,
    command: str = "",
    report_only: bool = False,
    fill_kl: bool = False,
) -> list[dict]:
    """Run every cell not already finished under `out/cells/`; return all rows.

    `distill_methods` (labels of `methods`) add a cell LABEL+distill per ratio: the compressed
    model of LABEL's cell (kept for it), distilled with `distill_options` (the same budget for
    every method), then evaluated like the others. `fill_kl`: finished cells without KL to the dense model
    (scored before it was measured) get their model rebuilt and KL/top-1 added, after checking that the
    rebuilt plan and perplexity equal the recorded ones."""
    from ..engine.options import validated
    from ..engine.pipeline import compress
    from ..evaluation.evaluate import evaluate, fidelity_to_source
    from ..methods import get_spec

    specs = {spec.label: spec for spec in map(parse_method_spec, methods)}
    if len(specs) != len(methods):
        raise ComeError("--methods names a label twice")
    methods = list(specs)
    base_of = {label: spec.method for label, spec in specs.items()}
    for method in base_of.values():
        if method != DENSE:
            get_spec(method)  # unknown names fail before any work
    stray = sorted(set(method_options or {}) - set(methods))
    if stray:
        raise ComeError(f"--set names method(s) not in --methods: {', '.join(stray)}")
    # What each label runs with, checked before any work: its --set over the grid-wide options.
    grid_wide = validated(compress_options or {}, "options")
    resolved = {}
    for label in methods:
        if label != DENSE:
            given = validated((method_options or {}).get(label, {}), label)
            try:
                resolved[label] = cell_options(base_of[label], {**grid_wide, **given})
            except ComeError as exc:
                raise ComeError(f"{label}: {exc}") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ComeError(f"--ratios must be values in (0, 1), got {ratios}")
    distill_methods = list(distill_methods or [])
    unknown = sorted(set(distill_methods) - (set(methods) - {DENSE}))
    if unknown:
        raise ComeError(f"--distill names method(s) not in --methods: {', '.join(unknown)}")
    grid_only = sorted(set(distill_options or {}) & set(DISTILL_RUN_CONTROL))
    if grid_only:
        raise ComeError(f"distillation option(s) {', '.join(grid_only)}: the grid's (--seed, --quiet) or run "
                        "controls, not part of a cell")
    out = Path(out)
    check_writable(out, "bench")  # before hours of work, not after the first cell
    (out / "cells").mkdir(parents=True, exist_ok=True)
    only_at = {label: spec.ratios for label, spec in specs.items()}
    cells = [(m, 0.0) for m in methods if m == DENSE] + [
        (m, r) for r in ratios for m in methods if m != DENSE and (only_at[m] is None or r in only_at[m])]
    cells += [(f"{m}{DISTILLED}", r) for r in ratios for m in distill_methods if only_at[m] is None or r in only_at[m]]
    distilled_with = distill_settings(distill_options or {}) if distill_methods else None
    settings = {  # what every cell shares; seqlen is the perplexity window's
        "model": model,
        "ppl": ppl_sources,
        "tasks": tasks,
        "limit": limit,
        "ppl_max_tokens": ppl_max_tokens,
        "seqlen": seqlen,
        "seed": seed,
    }
    # Every cell's model is written (and evaluated) in one dtype, so methods compare on equal terms;
    # recorded only when not float32, so cells finished before this knob existed stay valid.
    if save_dtype != "float32":
        settings["save_dtype"] = save_dtype
    missing = []
    to_fill: list[tuple] = []  # (name, cell file, cell, model folder, keep it): rebuilt models waiting for their KL

    def fill_group() -> None:
        # Up to FILL_GROUP rebuilt models evaluated together: the dense model's pass is shared by all of them.
        try:
            evaluations = fidelity_to_source([str(entry[3]) for entry in to_fill], ppl_sources, seqlen=seqlen,
                                             max_tokens=ppl_max_tokens, batch_size=batch_size, progress=progress)
            refused = []
            for (name, cell_file, cell, _, _), evaluation in zip(to_fill, evaluations, strict=True):
                try:
                    _add_fidelity(cell, evaluation, name)
                except ComeError as exc:  # the others of the group are still filled
                    refused.append(str(exc))
                    continue
                write_json_atomic(cell_file, cell)
            if refused:
                raise ComeError("; ".join(refused))
        finally:
            for _, _, _, model_dir, keep in to_fill:
                if not keep:
                    shutil.rmtree(model_dir, ignore_errors=True)
            to_fill.clear()

    for label, ratio in cells:
        name = cell_name(label, ratio)
        cell_file = out / "cells" / f"{name}.json"
        method = label.removesuffix(DISTILLED)
        distilled = method != label
        # A cell depends on the shared settings and on the options its own method runs with, resolved.
        cell_settings = dict(settings)
        if method != DENSE:
            cell_settings.update(method=base_of[method], options=resolved[method])
        if distilled:
            cell_settings["distill"] = distilled_with
        previous = json.loads(cell_file.read_text()) if cell_file.is_file() else None
        if previous is not None:
            previous["settings"] = migrate_settings(previous.get("settings") or {}, label)
            if previous["settings"] != cell_settings:
                previous = None  # made under other settings: redo
        # --fill-kl: a finished compressed cell scored before KL was measured gets its model rebuilt (same
        # settings, so the same plan: checked) and only KL and top-1 agreement added.
        fill = (previous is not None and fill_kl and method != DENSE and "error" not in previous["row"]
                and not (previous.get("evaluation") or {}).get("fidelity"))
        if previous is not None and not fill:
            print(f"[bench] {name}: done already, skipped", flush=True)
            continue
        if report_only:
            if previous is None:
                missing.append(name)
            continue
        print(f"[bench] {name}" + (": adding KL to the dense model" if fill else ""), flush=True)
        model_dir, compress_seconds, distill_seconds, plan = model, None, None, None
        if method != DENSE:
            model_dir = out / "models" / cell_name(method, ratio)
            made_with = {k: v for k, v in cell_settings.items() if k != "distill"}
            stamp = model_dir / BENCH_STAMP
            reuse = ((distilled or fill) and stamp.is_file()
                     and migrate_settings(json.loads(stamp.read_text()), method) == made_with)
            # The finished cell whose plan the model can be rebuilt from: this cell's own (--fill-kl), or, for a
            # distilled cell, its plain cell's (the same compression, so its search need not run again).
            source = None  # none needed when a kept model is reused
            if not reuse and fill:
                source = previous
            elif not reuse and distilled:
                source = _finished_cell(out, cell_name(method, ratio), made_with, method)
            dropped = _deleted_layers(source, resolved[method]) if source is not None else None
            replay = (_replay_plan(source, base_of[method], resolved[method])
                      if source is not None and dropped is None else None)
            rebuilt = False
            if dropped is not None:
                # Its plan only deletes layers: `drop` replays it in one pass instead of rerunning the search;
                # the plan is checked below (and, for a fill, the perplexities by _add_fidelity).
                compress(model, ratio=ratio, method="drop", drop_layers=dropped, out=model_dir, overwrite=True,
                         seed=seed, save_dtype=save_dtype, progress=progress)
                rebuilt = True
            elif replay is not None:
                # A come-search or CoMe plan: `replay` applies its recorded steps without the search (the chosen
                # operations only), with the cell's options; checked the same way.
                plan_file = out / "models" / f"{name}.replay.json"
                write_json_atomic(plan_file, replay)
                try:
                    compress(model, ratio=ratio, method="replay", replay_plan=str(plan_file), out=model_dir,
                             overwrite=True, seed=seed, save_dtype=save_dtype, progress=progress, **resolved[method])
                finally:
                    plan_file.unlink(missing_ok=True)
                rebuilt = True
            if distilled and rebuilt:  # the plain cell's model, or it is compressed again below
                difference = _plan_difference(source, json.loads((model_dir / "come_plan.json").read_text()))
                if difference is None:
                    compress_seconds = source["row"].get("compress_seconds")  # what making that model cost
                else:
                    print(f"[bench] {name}: the rebuilt model's plan differs from the plain cell's ({difference}): "
                          "compressing instead", flush=True)
                    rebuilt = False
            if not reuse and not rebuilt:  # a plain cell, or a distilled one its plain cell cannot give
                start = time.perf_counter()
                try:
                    result = compress(model, ratio=ratio, method=base_of[method], out=model_dir, overwrite=True,
                                      seed=seed, save_dtype=save_dtype, progress=progress, **resolved[method])
                except ComeError as exc:  # e.g. no eligible window: a result too, keep going
                    print(f"[bench] {name}: failed: {exc}", flush=True)
                    row = {"method": label, "ratio": ratio, "error": str(exc)}
                    write_json_atomic(cell_file, {"settings": cell_settings, "row": row})
                    continue
                compress_seconds = time.perf_counter() - start
                del result
                atomic_write_text(stamp, json.dumps(made_with))
            plan = json.loads((model_dir / "come_plan.json").read_text())
        if distilled:
            from ..distill import distill

            start = time.perf_counter()
            distill(model_dir, out / "models" / name, overwrite=True, seed=seed, progress=progress, **distilled_with)
            distill_seconds = time.perf_counter() - start
            if not keep_models:
                shutil.rmtree(model_dir, ignore_errors=True)
            model_dir = out / "models" / name
        keep = keep_models or (not distilled and label in distill_methods)  # its distilled cell needs it
        if fill:
            try:
                _check_plan(previous, plan, name)  # before any evaluation
            except ComeError:
                if not keep:
                    shutil.rmtree(model_dir, ignore_errors=True)
                raise
            to_fill.append((name, cell_file, previous, model_dir, keep))
            if len(to_fill) == FILL_GROUP:
                fill_group()
            continue
        try:
            evaluation = evaluate(
                str(model_dir) if model_dir is not None else None,
                ppl_sources=ppl_sources,
                tasks=tasks,
                limit=limit,
                seqlen=seqlen,
                max_tokens=ppl_max_tokens,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
                reference=None if method == DENSE else "plan",  # KL to the model the plan was made from
                reference_scores=False,  # skill above chance is computed against the dense cell instead
            )
        finally:
            if method != DENSE and not keep:
                shutil.rmtree(model_dir, ignore_errors=True)
        row = {
            "method": label,
            "ratio": ratio,
            "layers": evaluation["layers"],
            "parameters": evaluation["parameters"],
            "removed_fraction": plan["removed_parameter_fraction"] if plan else 0.0,
            "compress_seconds": round(compress_seconds, 1) if compress_seconds is not None else None,
            "layer_passes": plan["execution"].get("layer_passes") if plan else None,
        }
        if distilled:
            row["distill_seconds"] = round(distill_seconds, 1)
        for source, r in evaluation["perplexity"].items():
            row[f"ppl_{source}"] = r["ppl"]
        _fidelity_columns(row, evaluation)
        zs = evaluation.get("zero_shot")
        if zs:
            for task, r in zs["tasks"].items():
                row[task] = r[r["average_metric"]]
                row[f"{task}_stderr"] = r[f"{r['average_metric']}_stderr"]
            row["n_per_task"] = min(r["n"] for r in zs["tasks"].values())
            row["avg_acc"] = zs["average"]
            row["avg_acc_stderr"] = zs.get("average_stderr")
        write_json_atomic(cell_file, {"settings": cell_settings, "row": row, "evaluation": evaluation, "plan_steps": plan["steps"] if plan else None,
                                      "plan_layers": plan["layers"] if plan else None})

    if to_fill:
        fill_group()
    rows, per_doc = [], {}
    for method, ratio in cells:
        if cell_name(method, ratio) not in missing:
            data = json.loads((out / "cells" / f"{cell_name(method, ratio)}.json").read_text())
            rows.append(data["row"])
            tasks_scored = ((data.get("evaluation") or {}).get("zero_shot") or {}).get("tasks", {})
            if tasks_scored and all("per_doc" in t for t in tasks_scored.values()):
                per_doc[(method, ratio)] = {name: t["per_doc"] for name, t in tasks_scored.items()}
    add_skill(rows)
    shown = {**settings, "options": {label: {"method": base_of[label], **_differences(base_of[label], options)}
                                     for label, options in resolved.items()}}
    if distilled_with is not None:
        shown["distill"] = distilled_with
    write_tables(rows, out, shown, command, missing, per_doc)
    plot(rows, out / "results.png")
    return rows


def _differences(method: str, options: dict) -> dict:
    """The options that differ from the method's defaults, for the table (the cells hold them all)."""
    defaults = cell_options(method, {})
    return {k: v for k, v in options.items() if v != defaults[k]}


def _fidelity_columns(row: dict, evaluation: dict) -> None:
    for source, f in (evaluation.get("fidelity") or {}).items():
        row[f"kl_{source}"] = f["kl"]
        row[f"top1_{source}"] = f["top1"]


def _deleted_layers(cell: dict, options: dict) -> list[int] | None:
    """The original layers a finished cell's plan deleted, when deleting them is all it did (no merge, no
    refit): its model is then the original without those layers, whatever search chose them."""
    layers = cell.get("plan_layers")
    plain = {"index", "covers", "position_of", "merged", "merge"}  # anything else (a refit, a transform) changed weights
    if not layers or options.get("refit") or any(layer.get("merged") or layer.get("merge") or set(layer) - plain
                                                 for layer in layers):
        return None
    original = max(max(layer["covers"]) for layer in layers) + 1
    kept = {layer["position_of"] for layer in layers}
    return sorted(set(range(original)) - kept)


def _finished_cell(out: Path, name: str, settings: dict, label: str) -> dict | None:
    """The finished, error-free cell `name` under `out`, if it was made with `settings` (else None)."""
    cell_file = out / "cells" / f"{name}.json"
    if not cell_file.is_file():
        return None
    cell = json.loads(cell_file.read_text())
    if "error" in cell.get("row", {}) or migrate_settings(cell.get("settings") or {}, label) != settings:
        return None
    return cell


def _replay_plan(cell: dict, method: str, options: dict) -> dict | None:
    """A plan `--method replay` can apply to rebuild a finished come-search or CoMe cell's model without its
    search, or None (another method, or steps recorded in a form replay does not read)."""
    from ..errors import MergeError
    from ..methods.replay import METHODS, operation

    steps, layers = cell.get("plan_steps"), cell.get("plan_layers")
    if method not in METHODS or not steps or not layers:
        return None
    try:
        for step in steps:
            operation(step, method)
    except (MergeError, KeyError, TypeError):
        return None
    return {"method": method, "steps": steps, "options": options, "final_layers": len(layers)}


def _same_plan(a, b, newer_keys: bool = False) -> bool:
    """Equal structure and values, floats to 1e-4 relative: a record's fit errors move in their last digits with
    the thread count and library versions; which layers and channels a plan keeps does not. `newer_keys`: `b`
    may hold keys `a` lacks (a newer version records more), every key of `a` must match."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys_ok = a.keys() <= b.keys() if newer_keys else a.keys() == b.keys()
        return keys_ok and all(_same_plan(a[k], b[k], newer_keys) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_plan(x, y, newer_keys) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
    return a == b and type(a) is type(b)


def _first_difference(a, b, where: str = "layers") -> str:
    """Where two plans first differ, e.g. "layers[8].transform.error_after: 0.3055 recorded, 0.3107 now"."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return (f"{where}: keys {sorted(a.keys() - b.keys())} recorded only, {sorted(b.keys() - a.keys())} "
                    "now only")
        return next((_first_difference(a[k], b[k], f"{where}.{k}") for k in a if not _same_plan(a[k], b[k])), "")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((_first_difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))
                     if not _same_plan(x, y)), "")
    return f"{where}: {a!r} recorded, {b!r} now"


def _plan_identity(layers: list[dict] | None) -> list[dict] | None:
    """What a plan's layers say about the model: the spans, the merges (kept channels) and the refit choices.
    Fit-error records are left out (they are diagnostics, and later versions record more of them); the
    perplexity check after the evaluation is what shows that the weights are the recorded model's."""
    if layers is None:
        return None
    out = []
    for layer in layers:
        entry = {k: layer.get(k) for k in ("covers", "position_of", "merged", "merge")}
        refit = layer.get("refit")
        if refit:
            entry["refit"] = {k: refit.get(k) for k in ("applied", "damping")}
        out.append(entry)
    return out


def _plan_difference(cell: dict, plan: dict) -> str | None:
    """Where a rebuilt model's plan differs from the one `cell` recorded, or None when it is the same plan."""
    recorded, rebuilt = _plan_identity(cell.get("plan_layers")), _plan_identity(plan["layers"])
    return None if _same_plan(recorded, rebuilt, newer_keys=True) else _first_difference(recorded, rebuilt)[:300]


def _check_plan(cell: dict, plan: dict, name: str) -> None:
    difference = _plan_difference(cell, plan)
    if difference is not None:
        raise ComeError(f"{name}: the rebuilt model's plan differs from the recorded one ({difference}); its KL "
                        "would not describe the cell's model (rerun the cell instead)")


def _add_fidelity(cell: dict, evaluation: dict, name: str) -> None:
    """Add a rebuilt model's KL/top-1 to its finished cell, after checking that it is the cell's model: its
    plan (`_check_plan`, before) and now its perplexities."""
    for source, r in evaluation["perplexity"].items():
        recorded = cell["row"].get(f"ppl_{source}")
        if recorded is not None and not math.isclose(r["ppl"], recorded, rel_tol=1e-3):
            raise ComeError(f"{name}: the rebuilt model's {source} perplexity {r['ppl']:.4f} differs from the recorded "
                            f"{recorded:.4f}; its KL would not describe the cell's model (rerun the cell instead)")
    cell["evaluation"]["fidelity"] = evaluation["fidelity"]
    cell["evaluation"]["reference"] = evaluation.get("reference")
    _fidelity_columns(cell["row"], evaluation)


def add_skill(rows: list[dict]) -> None:
    """Give each compressed row `skill_kept`: its accuracy above chance as a share of the dense row's,
    summed over the tasks where the dense model is more than two standard errors above chance."""
    from ..evaluation.evaluate import CHANCE, skill_above_chance

    dense = next((r for r in rows if r["method"] == DENSE), None)
    if dense is None:
        return
    reference = {t: (dense[t], dense.get(f"{t}_stderr")) for t in CHANCE if dense.get(t) is not None}
    for r in rows:
        if r["method"] != DENSE and all(r.get(t) is not None for t in reference) and reference:
            r["skill_kept"] = skill_above_chance({t: r[t] for t in reference}, reference)["skill_kept"]


def ranking(rows: list[dict]) -> list[str]:
    """Per ratio: the method with the lowest perplexity per source and the highest average accuracy,
    and which others are within one standard error of that average (the table cannot tell them apart)."""
    lines = []
    for ratio in sorted({r["ratio"] for r in rows if r["method"] != DENSE}):
        here = [r for r in rows if r["ratio"] == ratio and r["method"] != DENSE]
        parts = []
        for key in [k for k in dict.fromkeys(k for r in here for k in r) if k.startswith("ppl_")]:
            scored = [r for r in here if r.get(key) is not None]
            if scored:
                best = min(scored, key=lambda r: r[key])
                parts.append(f"lowest {key.removeprefix('ppl_')} perplexity: **{best['method']}** ({best[key]:.1f})")
        for key in [k for k in dict.fromkeys(k for r in here for k in r) if k.startswith("kl_")]:
            scored = [r for r in here if r.get(key) is not None]
            if scored:
                best = min(scored, key=lambda r: r[key])
                parts.append(f"lowest {key.removeprefix('kl_')} KL to dense: **{best['method']}** ({best[key]:.3f}; "
                             f"{len(scored)} of {len(here)} scored)")
        scored = [r for r in here if r.get("avg_acc") is not None]
        if scored:
            best = max(scored, key=lambda r: r["avg_acc"])
            se = best.get("avg_acc_stderr") or 0.0
            close = [r["method"] for r in scored if r is not best and r["avg_acc"] >= best["avg_acc"] - se]
            parts.append(f"highest average accuracy: **{best['method']}** ({best['avg_acc']:.4f} ± {se:.4f}"
                         + (f"; within one stderr: {', '.join(close)})" if close else ")"))
        lines.append(f"- ratio {ratio:g} ({len(here)} methods): " + "; ".join(parts))
    return lines


def paired_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> tuple[float, float] | None:
    """Average accuracy of a minus b over the tasks both scored on the same documents, and its standard
    error from the per-document differences. Both models answer the same questions, so most of what makes
    one model's score uncertain (which questions were drawn) cancels: the paired error is the one that
    tells two methods apart, often several times smaller than either score's own."""
    tasks = [t for t in a if t in b and len(a[t]) == len(b[t]) and len(a[t]) > 1]
    if not tasks or len(tasks) != len(a) or len(tasks) != len(b):
        return None
    means, variances = [], []
    for t in tasks:
        d = [x - y for x, y in zip(a[t], b[t])]
        n = len(d)
        mean = math.fsum(d) / n
        means.append(mean)
        variances.append(math.fsum((v - mean) ** 2 for v in d) / (n - 1) / n)
    return math.fsum(means) / len(tasks), math.sqrt(math.fsum(variances)) / len(tasks)


def paired_lines(rows: list[dict], per_doc: dict) -> list[str]:
    """Per ratio: every method's average accuracy minus the best one's, with the paired standard error."""
    lines = []
    for ratio in sorted({r["ratio"] for r in rows if r["method"] != DENSE}):
        here = [r for r in rows if r["ratio"] == ratio and r["method"] != DENSE and (r["method"], ratio) in per_doc
                and r.get("avg_acc") is not None]
        if len(here) < 2:
            continue
        best = max(here, key=lambda r: r["avg_acc"])
        parts = []
        for r in sorted(here, key=lambda r: -r["avg_acc"]):
            if r is best:
                continue
            diff = paired_difference(per_doc[(r["method"], ratio)], per_doc[(best["method"], ratio)])
            if diff is not None:
                parts.append(f"{r['method']} {diff[0]:+.4f} ± {diff[1]:.4f}")
        if parts:
            lines.append(f"- ratio {ratio:g}, minus **{best['method']}**: " + "; ".join(parts))
    return lines


def write_tables(rows: list[dict], out: Path, settings: dict, command: str, missing: list[str] | None = None,
                 per_doc: dict | None = None) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    # the measures without a chance floor next to perplexity, whatever order the cells were scored in
    fidelity = [c for c in columns if c.startswith(("kl_", "top1_")) or c == "skill_kept"]
    rest = [c for c in columns if c not in fidelity]
    after = max((i for i, c in enumerate(rest) if c.startswith("ppl_")), default=len(rest) - 1) + 1
    columns = rest[:after] + fidelity + rest[after:]
    with atomic_file(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
        return str(value)

    # Markdown shows "value ± stderr" in one column; the CSV keeps them apart.
    shown = [c for c in columns if not c.endswith("_stderr")]

    def cell(r, c):
        se = r.get(f"{c}_stderr")
        return fmt(r.get(c)) + (f" ± {se:.4f}" if isinstance(se, float) and r.get(c) is not None else "")

    lines = [
        "# come bench results",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"Settings: `{json.dumps(settings)}`",
        "",
        "Average accuracy: acc_norm for arc_challenge, hellaswag, openbookqa; acc for the others. "
        "± is lm-eval's standard error; the average's is sqrt(sum of squared task stderrs) / tasks. "
        "kl_SOURCE: mean per-token KL(dense || model) in nats on the perplexity windows; top1_SOURCE: share of "
        "positions where both pick the same next token. skill_kept: accuracy above chance summed over the tasks "
        "where the dense model is more than two stderrs above chance, as a share of the dense model's "
        "(chance: 1 / choices per question).",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join(cell(r, c) for c in shown) + " |" for r in rows]
    if missing:
        lines[1:1] = ["", f"**Partial table**: {len(missing)} cell(s) of the command not run yet: {', '.join(missing)}."]
    lines += ["", "Per ratio, among the rows above:", "", *ranking(rows)]
    paired = paired_lines(rows, per_doc or {})
    if paired:
        lines += ["", "Paired differences of average accuracy (same documents; ± from the per-document differences; "
                      "cells scored before per-document results were kept are left out):", "", *paired]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for r in rows for k in r))
    metrics = [k for k in keys if k.startswith("ppl_")] + (["avg_acc"] if "avg_acc" in keys else [])
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    dense = next((r for r in rows if r["method"] == DENSE), None)
    for ax, metric in zip(axes[0], metrics):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != DENSE):
            pts = sorted(
                (r["removed_fraction"], r[metric]) for r in rows if r["method"] == method and r.get(metric) is not None
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if dense is not None and dense.get(metric) is not None:
            ax.axhline(dense[metric], color="black", linestyle="--", label="dense")
        ax.set_xlabel("fraction of parameters removed")
        ax.set_ylabel(metric)
        if metric.startswith("ppl_"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:  # the format is named: the temporary's name has no .png
        fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png")
    plt.close(fig)
