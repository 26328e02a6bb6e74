"""replay: apply the steps of a recorded come-search or CoMe plan without searching.

Each step's operation (which window is merged with which channel-share rule, which layer is deleted) is read
from the plan; what depends on the model's activations (block influence, channel sensitivities, refits) is
computed again, in the same order, on the same calibration. With the options the plan was made with, that is
the same computation the search did for the operation it chose, so the model comes out the same. Those options
default to the plan's, and one given otherwise is refused before any work. What replay saves is the search:
the candidates that were scored and not chosen. For the plans of one-shot deletions (shortgpt, sleb, ...) use
`drop`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import MergeError
from .come import bi_ratios, merge_with_ratios
from .come_p import candidate_ratios

# Options that change what a step computes: they must be the plan's. (Execution options such as where the
# activations are kept do not change the result.)
SAME_AS_PLAN = ("calib", "nsamples", "seqlen", "seed", "batch_size", "norm", "output_norm", "refit",
                "refit_damping", "activation_dtype", "autocast")
METHODS = ("come-search", "come", "replay")  # a replayed plan records the operations it applied: it replays too


def read_plan(path) -> dict:
    """The plan (a come_plan.json, or the model folder holding one), checked to be one replay can apply."""
    path = Path(path)
    if path.is_dir():
        path = path / "come_plan.json"
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"--replay-plan: cannot read a plan from {path}: {exc}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list) or "method" not in plan:
        raise MergeError(f"--replay-plan: {path} is not a come plan (no method and steps)")
    if plan["method"] not in METHODS:
        raise MergeError(f"--replay-plan: replay applies plans of {', '.join(METHODS)}; {path} was made by "
                         f"{plan['method']!r} (for a plan that only deletes layers, use --method drop)")
    return plan


def plan_defaults(options) -> dict:
    """The plan's values of the options that change what a step computes, as defaults under those given."""
    path = options.get("replay_plan")
    if not path:
        return {}
    recorded = recorded_options(read_plan(path))
    _refuse_differences(recorded, {k: v for k, v in options.items() if v is not None})
    return {name: recorded[name] for name in SAME_AS_PLAN if name in recorded}


def recorded_options(plan: dict) -> dict:
    """The plan's options, with `autocast: auto` replaced by what it resolved to where the plan was made (its
    execution record): a replay on a device without native bfloat16 then computes as the plan's did."""
    recorded = dict(plan.get("options") or {})
    ran = (plan.get("execution") or {}).get("layer_pass_precision")
    if recorded.get("autocast") == "auto" and ran is not None:
        recorded["autocast"] = "on" if ran == "bfloat16 autocast" else "off"
    return recorded


def _refuse_differences(recorded: dict, values: dict) -> None:
    differ = [n for n in SAME_AS_PLAN if n in recorded and n in values and _json(values[n]) != _json(recorded[n])]
    if differ:
        flags = " ".join(f"--{n.replace('_', '-')} {_cli_value(recorded[n])}" for n in differ)
        raise MergeError(f"--replay-plan: the plan was made with other options ({flags}); replay recomputes "
                         "channels and refits on the calibration, so it needs the plan's (they are its defaults)")


def _json(value):
    return json.loads(json.dumps(value))


def check_compatible(ctx, plan: dict, target_layers: int) -> None:
    """Refuse, before any work, a plan made for another model shape, another target or other options."""
    if plan.get("original_layers") not in (None, ctx.num_layers):
        raise MergeError(f"--replay-plan: the plan was made for a model of {plan.get('original_layers')} layers; "
                         f"this one has {ctx.num_layers}")
    if plan.get("final_layers") != target_layers:
        raise MergeError(f"--replay-plan: the plan ends at {plan.get('final_layers')} layers, this run's target is "
                         f"{target_layers}: pass --target-layers {plan.get('final_layers')}")
    _refuse_differences(recorded_options(plan), {n: getattr(ctx.options, n) for n in SAME_AS_PLAN})


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _ratios(bi, start: int, size: int, rule: str) -> list[float]:
    if rule == "bi":
        return bi_ratios(bi, start, size)
    if rule.startswith("r="):
        return candidate_ratios(bi, start, size, float(rule[2:]))
    raise MergeError(f"--replay-plan: unknown channel-share rule {rule!r} in the plan")


def operation(step: dict, method: str) -> dict:
    """{"op": "merge", "window": [a, b], "ratios": rule} or {"op": "delete", "layer": k} of a recorded step."""
    if isinstance(step.get("replayed"), dict) and step["replayed"].get("op") in ("merge", "delete"):
        return step["replayed"]
    if method == "come-search":
        chosen = step.get("chosen") or {}
        if chosen.get("op") == "merge":
            return {"op": "merge", "window": chosen["window"], "ratios": chosen.get("ratios", "bi"),
                    "rule": "come-search"}
        if chosen.get("op") == "delete":
            return {"op": "delete", "layer": chosen["layer"]}
    elif "window" in step:
        return {"op": "merge", "window": step["window"], "ratios": "bi"}
    raise MergeError(f"--replay-plan: step {step.get('step')} records no operation replay can apply")


def run(ctx, target_layers: int) -> None:
    if not ctx.options.replay_plan:
        raise MergeError("--method replay needs --replay-plan (a come_plan.json or the model folder holding it)")
    plan = read_plan(ctx.options.replay_plan)
    check_compatible(ctx, plan, target_layers)
    method = plan["method"]
    with tqdm(total=ctx.num_layers - target_layers, desc="replaying the plan", unit="layer",
              disable=not ctx.options.progress) as bar:
        for recorded in plan["steps"]:
            op, before = operation(recorded, method), ctx.num_layers
            step = {"step": len(ctx.steps), "layers_before": before, "replayed": op}
            if op["op"] == "merge":
                start, end = op["window"]
                size = end - start + 1
                if not (0 <= start and end < before and size >= 2):
                    raise MergeError(f"--replay-plan: step {recorded.get('step')} merges layers {start}-{end} "
                                     f"of {before}")
                # Block influence (every boundary) only for a merge's shares: a deletion's refit reads the
                # boundaries up to its owner, so later ones are computed when a later step needs them.
                ratios = _ratios(ctx.cache.block_influence(), start, size, op["ratios"])
                merged, record = merge_with_ratios(ctx, start, size, ratios)
                if op.get("rule") == "come-search":  # as the search records its merges
                    record = {**record, "rule": "come-search", "ratios": op["ratios"]}
                step["covers"] = [c for r in ctx.records[start : end + 1] for c in r["covers"]]
                ctx.steps.append(step)
                ctx.merge_window(start, merged, size, record)  # refitted there when the options say so
            else:
                k = op["layer"]
                if not 0 <= k < before or before < 2:
                    raise MergeError(f"--replay-plan: step {recorded.get('step')} deletes layer {k} of {before}")
                step["covers"] = list(ctx.records[k]["covers"])
                ctx.steps.append(step)
                ctx.remove_layers([k])  # the span goes to the layer before it, refitted when the options say so
            bar.update(before - ctx.num_layers)
    if ctx.num_layers != target_layers:
        raise MergeError(f"--replay-plan: the plan's steps end at {ctx.num_layers} layers, not {target_layers}")
