"""`come run RECIPE.yaml`: compress -> (distill) -> (eval) -> (GGUF export) declared in one file.

A recipe is validated as a whole before any work (unknown keys, wrong types and
impossible combinations are one error naming the key). Each stage writes into
the run folder and records the settings it ran with; a later run skips a stage
whose recorded settings match and whose output is there, so a run killed in
the middle continues at the stage that did not finish (every stage's output is
written atomically, so it is either complete or absent).

    model: smollm2-135m          # a folder, a .gguf, a hub id, or a built-in name
    out: runs/smollm2-0.3        # the run folder (--out overrides it)
    compress:
      method: come-search
      ratio: 0.3                 # or target_layers
      options: {nsamples: 32}    # any compression option (engine/options.py; `come compress --help`)
    distill:                     # optional; any `come distill` option
      tokens: 131072
      global_steps: 16
    eval:                        # optional
      ppl: [wikipedia, lambada]
      tasks: all
      limit: 300

Compression options are checked against their definitions (engine/options.py and
methods/catalog.py) and distillation options against `distill.DistillOptions`,
the same definitions the CLI and the Python API use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ComeError

STATE_FILE = "come_run.json"


class RecipeError(ComeError):
    pass


def _compression_options_model():
    from ..engine.options import all_options, schema

    return schema(all_options().values(), "CompressionOptions")


def _distill_options_model():
    from ..distill.options import DEFAULT_TOKENS, DistillOptions
    from ..engine.options import options_of, schema

    return schema(options_of(DistillOptions), "DistillStage", tokens=(Annotated[int, Field(ge=1)], DEFAULT_TOKENS))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompressStage(_Strict):
    method: Optional[str] = None
    ratio: Optional[float] = Field(None, gt=0, lt=1)
    target_layers: Optional[int] = Field(None, ge=1)
    options: dict[str, Any] = {}
    layerwise: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    save_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    max_shard_size: str = "2GB"

    @model_validator(mode="after")
    def _one_target(self):
        if (self.ratio is None) == (self.target_layers is None):
            raise ValueError("give exactly one of ratio or target_layers")
        return self


class EvalStage(_Strict):
    ppl: list[str] = ["wikipedia", "lambada"]
    tasks: Union[Literal["all", "none"], list[str]] = "all"
    limit: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=2)
    seqlen: int = Field(512, ge=2)
    batch_size: int = Field(8, ge=1)
    update_card: bool = True


class ExportStage(_Strict):
    gguf: list[Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]] = ["f16"]


class Recipe(_Strict):
    model: Optional[str] = None
    out: Optional[str] = None
    seed: int = 0
    compress: CompressStage
    distill: Optional[dict[str, Any]] = None
    eval: Optional[EvalStage] = None
    export: Optional[ExportStage] = None


def _messages(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def load_recipe(path: str | Path, out: str | None = None) -> tuple[Recipe, dict, dict]:
    """(recipe, compression options, distillation options), every key validated; raises RecipeError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no such recipe: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with at least a 'compress' section")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {_messages(exc)}") from None
    if out is not None:
        recipe.out = out
    if not recipe.out:
        raise RecipeError(f"{path}: out: the run folder is not set (in the recipe or with --out)")
    try:
        options = _compression_options_model().model_validate(recipe.compress.options)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {_messages(exc, 'compress.options')}") from None
    given = {k: v for k, v in recipe.compress.options.items()}
    if "seed" in given:
        raise RecipeError(f"{path}: compress.options.seed: set the seed once, at the top level")
    distill_options = {}
    if recipe.distill is not None:
        try:
            validated = _distill_options_model().model_validate(recipe.distill)
        except ValidationError as exc:
            raise RecipeError(f"{path}: {_messages(exc, 'distill')}") from None
        distill_options = {k: getattr(validated, k) for k in recipe.distill}
    _check_combinations(path, recipe, given)
    compression = {k: getattr(options, k) for k in given}
    return recipe, compression, distill_options


def _check_combinations(path: Path, recipe: Recipe, options: dict) -> None:
    from ..evaluation.tasks import PAPER_TASKS
    from ..methods import DEFAULT_METHOD, available_methods, layerwise_methods

    method = recipe.compress.method or DEFAULT_METHOD
    if method not in available_methods():
        raise RecipeError(f"{path}: compress.method: unknown method {method!r}; available: {', '.join(available_methods())}")
    if recipe.compress.layerwise and method not in layerwise_methods():
        raise RecipeError(f"{path}: compress.layerwise: method {method!r} cannot run layer-wise; "
                          f"layer-wise methods: {', '.join(layerwise_methods())}")
    if recipe.eval is not None and isinstance(recipe.eval.tasks, list):
        unknown = sorted(set(recipe.eval.tasks) - set(PAPER_TASKS))
        if unknown:
            raise RecipeError(f"{path}: eval.tasks: unknown task(s) {', '.join(unknown)}; available: {', '.join(PAPER_TASKS)}")
    if "refit_damping" in options:
        from ..core.refit import parse_damping

        try:
            parse_damping(options["refit_damping"])
        except ComeError as exc:
            raise RecipeError(f"{path}: compress.options.refit_damping: {exc}") from None
    if recipe.distill is not None and recipe.compress.layerwise:
        raise RecipeError(f"{path}: distill: a layer-wise run is for models larger than memory, which distillation "
                          "(it holds teacher and student) cannot train here; drop distill or compress.layerwise")


# -- running --------------------------------------------------------------------------
def _state(run: Path) -> dict:
    file = run / STATE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _record(run: Path, stage: str, settings: dict) -> None:
    from ..outputs import write_json_atomic

    state = _state(run)
    state[stage] = settings
    write_json_atomic(run / STATE_FILE, state)


def _done(run: Path, stage: str, settings: dict, output: Path) -> bool:
    return _state(run).get(stage) == settings and output.exists()


def run_recipe(path: str | Path, out: str | None = None, progress: bool = True, log=print) -> dict:
    """Run (or continue) the recipe at `path`; returns {stage: output path}."""
    from ..outputs import check_writable

    recipe, compression, distill_options = load_recipe(path, out)
    run = Path(recipe.out).expanduser().resolve()
    check_writable(run, "run")
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    try:
        return _run_stages(recipe, compression, distill_options, run, progress, log)
    except BaseException:
        if created and not any(run.iterdir()):  # a run that failed before writing anything leaves no empty folder
            run.rmdir()
        raise


def _run_stages(recipe, compression: dict, distill_options: dict, run: Path, progress: bool, log) -> dict:
    outputs: dict[str, str] = {}

    # 1. compress
    compress_settings = {"model": recipe.model, "seed": recipe.seed,
                         **recipe.compress.model_dump(exclude={"options"}), "options": compression}
    compressed = run / "compressed"
    if _done(run, "compress", compress_settings, compressed):
        log(f"[run] compress: done already ({compressed}), skipped")
    else:
        from ..engine.pipeline import compress

        log(f"[run] compress: {recipe.compress.method or 'default method'} -> {compressed}")
        c = recipe.compress
        compress(recipe.model, ratio=c.ratio, target_layers=c.target_layers, method=c.method or _default_method(),
                 out=compressed, overwrite=True, dtype=c.dtype, device=c.device, layerwise=c.layerwise,
                 max_shard_size=c.max_shard_size, save_dtype=c.save_dtype, seed=recipe.seed, progress=progress,
                 **compression)
        _record(run, "compress", compress_settings)
    outputs["compress"] = str(compressed)
    final = compressed

    # 2. distill
    if recipe.distill is not None:
        distilled = run / "distilled"
        distill_settings = {"after": compress_settings, "options": distill_options, "seed": recipe.seed}
        if _done(run, "distill", distill_settings, distilled):
            log(f"[run] distill: done already ({distilled}), skipped")
        else:
            from ..distill import distill

            log(f"[run] distill -> {distilled}")
            # A killed distillation keeps its checkpoints in distilled.partial/: continue from them.
            resume = (run / "distilled.partial").is_dir()
            distill(compressed, distilled, overwrite=not resume, resume=resume, seed=recipe.seed, progress=progress,
                    **distill_options)
            _record(run, "distill", distill_settings)
        outputs["distill"] = str(distilled)
        final = distilled

    # 3. eval
    if recipe.eval is not None:
        from ..evaluation.evaluate import evaluate, update_card
        from ..evaluation.tasks import PAPER_TASKS
        from ..outputs import write_json_atomic

        e = recipe.eval
        tasks = list(PAPER_TASKS) if e.tasks == "all" else ([] if e.tasks == "none" else e.tasks)
        settings = {"ppl_sources": e.ppl, "tasks": tasks, "limit": e.limit, "seqlen": e.seqlen,
                    "max_tokens": e.max_tokens, "batch_size": e.batch_size, "seed": recipe.seed}
        eval_file = run / "eval.json"
        eval_settings = {"of": str(final), "after": _state(run).get("distill" if recipe.distill else "compress"),
                         **settings, "update_card": e.update_card}
        if _done(run, "eval", eval_settings, eval_file):
            log(f"[run] eval: done already ({eval_file}), skipped")
        else:
            log(f"[run] eval of {final}")
            result = evaluate(str(final), progress=progress, reference="plan", **settings)  # + KL to the source model
            if e.update_card:
                update_card(final, result, settings, progress=progress)
            write_json_atomic(eval_file, result)
            _record(run, "eval", eval_settings)
        outputs["eval"] = str(eval_file)

    # 4. export
    if recipe.export is not None:
        from ..artifacts.gguf_export import export_gguf

        for qtype in recipe.export.gguf:
            file = run / f"model-{qtype}.gguf"
            settings = {"of": _state(run).get("distill" if recipe.distill else "compress"), "type": qtype}
            if _done(run, f"gguf-{qtype}", settings, file):
                log(f"[run] gguf {qtype}: done already ({file}), skipped")
            else:
                log(f"[run] gguf {qtype} -> {file}")
                export_gguf(final, file, qtype, overwrite=True, progress=progress)
                _record(run, f"gguf-{qtype}", settings)
            outputs[f"gguf-{qtype}"] = str(file)
    return outputs


def _default_method() -> str:
    from ..methods import DEFAULT_METHOD

    return DEFAULT_METHOD
