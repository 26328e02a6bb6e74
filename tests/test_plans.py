"""Recorded plans: every registered method, on a tiny model of every family, still does what it did.

The fixture `fixtures/method_plans.json` holds, for every case (a method, with its defaults or with one
of the option VARIANTS below, on a tiny random-weight model of a family: 8 layers taken to 5), what
determines the output model:

- `layers`: the plan's layer records (`come_plan.json` "layers": the original layers each output layer
  covers, the layer whose position it takes, its merge with the kept FFN neurons and KV groups of every
  source, its refit, its fold);
- `dropped`: the original layers deleted (covered by a layer `remove_layers` took out), and `merges`: the
  original layers of every merge's sources (intermediate merges included);
- `config`: the output's layer count and per-layer config fields; `final_parameters`;
- `weights`: per output decoder layer (all its tensors) and per other tensor, sum |w| and a fixed
  pseudo-random projection sum(w * sin(0.618 i)) (catches permuted channels);
- or `error`: the error a method gives on a family it refuses (replaceme on Gemma 3).

Integers, strings and lists compare exactly, floats within float noise. Methods that run layer-wise give
the same record from a saved folder (checked against the same entry). A method registered without a
recorded case fails `test_every_registered_method_and_family_has_a_recorded_plan`.

The test only compares. Rewrite the fixture only for a change meant to alter what a method picks or
writes, and say so in the commit:

    PYTHONPATH=src python tests/test_plans.py --regenerate                 # every case
    PYTHONPATH=src python tests/test_plans.py --regenerate come/llama ...  # only these cases
"""

from __future__ import annotations

import copy
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from come.core.adapters import ADAPTERS, adapter_for
from come.engine.models import LoadedModel
from come.engine.pipeline import CompressionContext, compress
from come.errors import ComeError
from come.methods import available_methods, layerwise_methods
from come.testing import FAMILIES, tiny_model, tiny_tokens

FIXTURE = Path(__file__).parent / "fixtures" / "method_plans.json"
SEED, LAYERS, TARGET = 31, 8, 5
TOKENS = tiny_tokens(nsamples=8, seqlen=24, seed=3)
# Options a method cannot run without.
REQUIRED = {"drop": {"drop_layers": (1, 4, 6)}}
# Option variants worth pinning beyond each method's defaults: name -> (method, options).
VARIANTS = {
    "come[paper]": ("come", {"norm": "mean", "output_norm": "mean", "allow_remerge": False}),
    "come-search[kl,ratios,error+loss]": ("come-search", {"search_loss": "kl", "search_ratios": (0.5,),
                                                          "search_deletion_rank": "error+loss"}),
    "come-search[no-refit]": ("come-search", {"refit": False}),
    "come-search[no-screen]": ("come-search", {"search_finalists": 0}),
    "come-search[float32]": ("come-search", {"activation_dtype": "float32"}),  # the default before bfloat16 activations
    "shortgpt[refit]": ("shortgpt", {"refit": True}),
    "sleb[kl]": ("sleb", {"search_loss": "kl"}),
    "replaceme[cosine,2-blocks]": ("replaceme", {"replaceme_objective": "cosine", "replaceme_epochs": 2,
                                                  "replaceme_blocks": 2}),
    "laco[thresholds]": ("laco", {"laco_thresholds": (0.99, 0.6), "laco_interval": 1}),
}
REL, ABS = 1e-4, 1e-5  # float noise allowed in plan values
WEIGHT_REL = 1e-5  # of a layer's or tensor's sum |w|, on both of its numbers


def method_cases() -> dict[str, tuple[str, dict]]:
    """Every registered method with its defaults, then the variants: name -> (method, options)."""
    # replay applies another method's plan: its output is that method's model, compared tensor by tensor with the
    # searched model in tests/methods/test_replay.py, so it has no plan of its own to record here.
    cases = {m: (m, dict(REQUIRED.get(m, {}))) for m in available_methods() if m != "replay"}
    cases.update({name: (m, {**REQUIRED.get(m, {}), **opts}) for name, (m, opts) in VARIANTS.items()})
    return cases


def cases() -> dict[str, tuple[str, dict, str]]:
    """name -> (method, options, family), named method/family."""
    return {f"{name}/{family}": (m, opts, family) for name, (m, opts) in method_cases().items() for family in FAMILIES}


# -- running a case and recording what determines the output ---------------------------------------
@contextmanager
def _recording_edits():
    """Log the original layers of every deleted layer and of every merge's sources."""
    log = {"dropped": [], "merges": []}
    remove, merge = CompressionContext.remove_layers, CompressionContext.merge_window

    def remove_layers(self, removed, *args, **kwargs):
        log["dropped"] += [c for k in set(removed) for c in self.records[k]["covers"]]
        return remove(self, removed, *args, **kwargs)

    def merge_window(self, start, new_layer, size, *args, **kwargs):
        log["merges"].append([list(self.records[k]["covers"]) for k in range(start, start + size)])
        return merge(self, start, new_layer, size, *args, **kwargs)

    CompressionContext.remove_layers, CompressionContext.merge_window = remove_layers, merge_window
    try:
        yield log
    finally:
        CompressionContext.remove_layers, CompressionContext.merge_window = remove, merge


def _model(family):
    return tiny_model(family, seed=SEED, num_hidden_layers=LAYERS)


def _significant(x: float) -> float:
    return float(f"{x:.9g}")


def weight_summary(state: dict) -> dict:
    """Per decoder layer (its tensors together) and per other tensor: [sum |w|, sum w * sin(0.618 i)]."""
    summary: dict[str, list[float]] = {}
    for name, tensor in sorted(state.items()):
        w = tensor.detach().double().flatten()
        probe = torch.sin(0.618 * torch.arange(w.numel(), dtype=torch.float64))
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[1:2] == ["layers"] else name  # model.layers.k
        total = summary.setdefault(key, [0.0, 0.0])
        total[0] += w.abs().sum().item()
        total[1] += (w * probe).sum().item()
    return {key: [_significant(a), _significant(p)] for key, (a, p) in summary.items()}


def _config_fields(config) -> dict:
    adapter = adapter_for(config)
    names = ["num_hidden_layers", *adapter.per_layer_lists, *adapter.layer_count_fields]
    return {name: getattr(config, name) for name in names if getattr(config, name, None) is not None}


def _record(result, log, model) -> dict:
    layers = json.loads(json.dumps(result.plan["layers"], allow_nan=False))
    return {
        "layers": layers,
        "dropped": sorted(log["dropped"]),
        "merges": sorted(log["merges"]),
        "config": _config_fields(model.config),
        "final_parameters": result.plan["final_parameters"],
        "weights": weight_summary(model.state_dict()),
    }


def run_case(method, options, family) -> dict:
    """The record of one case, computed in memory."""
    with _recording_edits() as log:
        try:
            result = compress(LoadedModel(_model(family), None, {}), target_layers=TARGET, method=method,
                              tokens=TOKENS, progress=False, batch_size=4, **copy.deepcopy(options))
        except ComeError as e:
            return {"error": f"{type(e).__name__}: {e}"}
    return _record(result, log, result.model)


def run_case_layerwise(method, options, family, folder: Path, out: Path) -> dict:
    """The record of one case computed layer-wise from `folder` (the saved model), written to `out`."""
    from transformers import AutoModelForCausalLM

    with _recording_edits() as log:
        try:
            result = compress(str(folder), layerwise=True, out=out, target_layers=TARGET, method=method,
                              tokens=TOKENS, progress=False, batch_size=4, **copy.deepcopy(options))
        except ComeError as e:
            return {"error": f"{type(e).__name__}: {e}"}
    return _record(result, log, AutoModelForCausalLM.from_pretrained(out).eval())


# -- comparing ----------------------------------------------------------------------------------------
def differences(expected, actual, path="") -> list[str]:
    """Where `actual` differs from `expected`: types, keys, lengths, ints and strings exactly, floats
    within REL / ABS."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        # The held-out errors of the dampings a refit's walk scored: which ones depends on where the walk
        # starts (the previous refit's choice), so only the values both scored must agree; the damping
        # it picks is compared too, and its value must be among them.
        partial = path.endswith(".held_out_errors") and bool(actual)
        out = [] if partial else [f"{path}: missing key {k!r}" for k in expected if k not in actual]
        out += [] if partial else [f"{path}: unexpected key {k!r}" for k in actual if k not in expected]
        for k in expected.keys() & actual.keys():
            out += differences(expected[k], actual[k], f"{path}.{k}")
        chosen = actual.get("damping") if "held_out_errors" in actual else None
        if chosen is not None and not all(f"{chosen:g}" in r.get("held_out_errors", {}) for r in (expected, actual)):
            out.append(f"{path}: the chosen damping {chosen:g} is not among the held-out errors both scored")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(actual)} items, recorded {len(expected)}: {actual!r} != {expected!r}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]")]
    if type(expected) is float and type(actual) in (float, int):
        return [] if math.isclose(actual, expected, rel_tol=REL, abs_tol=ABS) else [f"{path}: {actual!r} != {expected!r}"]
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: {actual!r} != recorded {expected!r}"]
    return []


def weight_differences(expected: dict, actual: dict) -> list[str]:
    if expected.keys() != actual.keys():
        return [f"weights: tensors {sorted(actual.keys() ^ expected.keys())} differ"]
    out = []
    for name, (abs_sum, projection) in expected.items():
        tol = WEIGHT_REL * abs_sum + 1e-9
        got = actual[name]
        if abs(got[0] - abs_sum) > tol or abs(got[1] - projection) > tol:
            out.append(f"weights.{name}: {got} != recorded {[abs_sum, projection]}")
    return out


def assert_matches(expected: dict, actual: dict) -> None:
    problems = differences({k: v for k, v in expected.items() if k != "weights"},
                           {k: v for k, v in actual.items() if k != "weights"})
    problems += weight_differences(expected.get("weights", {}), actual.get("weights", {}))
    assert not problems, "differs from the recorded plan:\n" + "\n".join(problems[:40])


def _recorded() -> dict:
    return json.loads(FIXTURE.read_text())["cases"]


# -- the tests ----------------------------------------------------------------------------------------
CASES = cases()
LAYERWISE_CASES = [name for name in CASES if CASES[name][0] in layerwise_methods()]


def _variants_slow(names):
    """The option variants' layer-wise runs are `slow` (their in-memory runs are not)."""
    return [pytest.param(n, marks=pytest.mark.slow) if "[" in n else n for n in names]


def test_every_registered_method_and_family_has_a_recorded_plan():
    assert {a.family for a in ADAPTERS} == set(FAMILIES), "come.testing.FAMILIES must name every adapter's family"
    recorded = _recorded()
    missing = sorted(set(CASES) - set(recorded))
    assert not missing, f"no recorded plan for {missing}: record them (see this module's docstring)"
    stale = sorted(set(recorded) - set(CASES))
    assert not stale, f"recorded plans of cases that no longer exist: {stale} (regenerate the fixture)"


@pytest.mark.parametrize("case", list(CASES))
def test_the_method_gives_the_recorded_plan(case):
    expected = _recorded().get(case)
    if expected is None:
        pytest.fail(f"no recorded plan for {case}: record it (see this module's docstring)")
    assert_matches(expected, run_case(*CASES[case]))


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """The tiny model of each family, saved once (layer-wise runs read a folder)."""
    root, folders = tmp_path_factory.mktemp("plans"), {}

    def folder(family):
        if family not in folders:
            folders[family] = root / family
            _model(family).save_pretrained(folders[family])
        return folders[family]

    return folder


@pytest.mark.parametrize("case", _variants_slow(LAYERWISE_CASES))
def test_layerwise_gives_the_recorded_plan(case, saved_models, tmp_path):
    expected = _recorded().get(case)
    if expected is None:
        pytest.fail(f"no recorded plan for {case}: record it (see this module's docstring)")
    method, options, family = CASES[case]
    assert_matches(expected, run_case_layerwise(method, options, family, saved_models(family), tmp_path / "out"))


# -- regenerating ---------------------------------------------------------------------------------
def regenerate(only: list[str]) -> None:
    import transformers

    unknown = [name for name in only if name not in CASES]
    if unknown:
        sys.exit(f"unknown cases {unknown}; cases: {', '.join(CASES)}")
    torch.set_num_threads(1)
    recorded = _recorded() if only and FIXTURE.is_file() else {}
    for name in only or CASES:
        recorded[name] = run_case(*CASES[name])
        print(name, "error" if "error" in recorded[name] else [layer["covers"] for layer in recorded[name]["layers"]])
    header = {"about": "tests/test_plans.py: what every method gives on tiny models; regenerate only for a change "
                       "meant to alter it",
              "recorded_with": {"torch": torch.__version__, "transformers": transformers.__version__}}
    # One line per case: a changed case is a one-line diff.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    cases_text = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in sorted(recorded.items()))
    FIXTURE.write_text("{\n" + ",\n".join(lines) + ',\n "cases": {\n' + cases_text + "\n }\n}\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--regenerate"]:
        sys.exit(__doc__)
    regenerate(sys.argv[2:])
