"""Offline lm-eval tasks (come.evaluation.tasks): data export, prompts, and end-to-end scoring of a tiny model."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from come.evaluation import tasks as come_tasks

# Standard eval split sizes (ARC/OBQA test; BoolQ, HellaSwag, PIQA, WinoGrande validation).
EXPECTED_DOCS = {
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "hellaswag": 10042,
    "openbookqa": 500,
    "piqa": 1838,
    "winogrande": 1267,
}
LIMIT = 3


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    # A private cache (export + Arrow conversion take ~2 s), also used through COME_CACHE.
    path = tmp_path_factory.mktemp("come_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COME_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def manager(cache_dir):
    return come_tasks.task_manager()


def test_export_writes_full_eval_splits_once(cache_dir):
    data_dir = come_tasks.export_offline_data()
    assert data_dir == cache_dir / "lm_eval_data"
    mtimes = {}
    for task, expected in EXPECTED_DOCS.items():
        path = data_dir / f"{task}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == expected, task
        json.loads(lines[0])
        mtimes[task] = path.stat().st_mtime_ns
    come_tasks.export_offline_data()  # present: skipped, not rewritten
    assert {t: (data_dir / f"{t}.jsonl").stat().st_mtime_ns for t in EXPECTED_DOCS} == mtimes


# First doc of each split, rendered as lm-eval's standard task renders it: (text, choices, target).
FIRST_DOC = {
    "arc_easy": (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        4,
        0,
    ),
    "arc_challenge": (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:",
        4,
        2,
    ),
    "boolq": ("\nQuestion: does ethanol take more energy make that produces?\nAnswer:", ["no", "yes"], 0),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", 4, 3),
    "openbookqa": (
        "A person wants to start saving money so that they can afford a nice vacation at the end of "
        "the year. After looking over their budget and expenses, they decide the best way to save money is to",
        4,
        1,
    ),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 2, 0),
    # Partial evaluation: the "text" is the gold choice index, choices are the two contexts.
    "winogrande": (
        1,
        [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ],
        "always got the easier cases.",
    ),
}


def test_offline_tasks_load_and_render_lm_eval_prompts(manager):
    loaded = manager.load([come_tasks.offline_task_name(t) for t in come_tasks.PAPER_TASKS])["tasks"]
    for task in come_tasks.PAPER_TASKS:
        harness_task = loaded[come_tasks.offline_task_name(task)]
        docs = list(harness_task.eval_docs)
        assert len(docs) == EXPECTED_DOCS[task], task
        text, choices, target = FIRST_DOC[task]
        rendered_text = harness_task.doc_to_text(docs[0])
        rendered_choices = harness_task.doc_to_choice(docs[0])
        if task == "boolq":  # the passage keeps SuperGLUE's "Title -- " prefix, as lm-eval's boolq
            assert rendered_text.startswith("Ethanol fuel -- All biomass") and rendered_text.endswith(text)
        else:
            assert rendered_text == text, task
        if isinstance(choices, int):
            assert len(rendered_choices) == choices, task
        else:
            assert rendered_choices == choices, task
        assert harness_task.doc_to_target(docs[0]) == target, task


@pytest.fixture(scope="session")
def tiny_llama():
    from come.testing import tiny_model

    # The real SmolLM2 tokenizer's vocabulary, the smallest body that runs.
    return tiny_model(
        "llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
    )


@pytest.fixture(scope="session")
def two_runs(tiny_llama, smollm2_tokenizer, cache_dir):
    return [come_tasks.zero_shot(tiny_llama, smollm2_tokenizer, limit=LIMIT, batch_size=4) for _ in range(2)]


def test_zero_shot_scores_all_tasks_end_to_end(two_runs):
    result = two_runs[0]
    assert set(result["tasks"]) == set(come_tasks.PAPER_TASKS)
    assert result["limit"] == LIMIT and result["lm_eval_version"]
    assert set(result["split_notes"]) == set(come_tasks.PAPER_TASKS)
    for task, scores in result["tasks"].items():
        assert scores["n"] == LIMIT, task
        assert 0.0 <= scores["acc"] <= 1.0, task
        # acc and acc_norm are kept apart; lm-eval has no acc_norm for boolq and winogrande.
        if task in ("boolq", "winogrande"):
            assert scores["acc_norm"] is None
        else:
            assert 0.0 <= scores["acc_norm"] <= 1.0, task
        assert scores["average_metric"] == come_tasks.AVERAGE_METRIC[task]
        # Per-document scores (for paired comparisons) average to the task's score.
        per_doc = scores["per_doc"]
        assert len(per_doc) == LIMIT and set(per_doc) <= {0.0, 1.0}
        assert math.isclose(sum(per_doc) / LIMIT, scores[scores["average_metric"]]), task


def test_average_uses_average_metric(two_runs):
    result = two_runs[0]
    assert result["average_metric"] == come_tasks.AVERAGE_METRIC
    expected = sum(s[come_tasks.AVERAGE_METRIC[t]] for t, s in result["tasks"].items()) / len(result["tasks"])
    assert math.isclose(result["average"], expected)


def test_zero_shot_is_deterministic(two_runs):
    assert two_runs[0] == two_runs[1]


def test_offline_rejects_tasks_without_offline_copy(tiny_llama, smollm2_tokenizer):
    with pytest.raises(ValueError, match="no offline copy"):
        come_tasks.zero_shot(tiny_llama, smollm2_tokenizer, tasks=["mmlu"], limit=1)


def test_head_on_continuations_only_gives_hflm_loglikelihoods(tiny_llama, smollm2_tokenizer):
    from lm_eval.models.huggingface import HFLM

    from come.evaluation.tasks.scoring_lm import continuation_lm_class

    gen = torch.Generator().manual_seed(0)
    requests = []
    for i in range(11):  # mixed lengths in a batch; some continuations end in token 0 (the pad id)
        ctx = torch.randint(1, 49152, (5 + 3 * i,), generator=gen).tolist()
        cont = torch.randint(1, 49152, (1 + i % 4,), generator=gen).tolist()
        if i % 3 == 0:
            cont[-1] = 0
        requests.append(((f"c{i}", f"x{i}"), ctx, cont))
    reference = HFLM(pretrained=tiny_llama, tokenizer=smollm2_tokenizer, batch_size=4)
    fast = continuation_lm_class()(pretrained=tiny_llama, tokenizer=smollm2_tokenizer, batch_size=4)
    widths = []
    call = tiny_llama.forward

    @functools.wraps(call)
    def spy(*args, **kwargs):
        out = call(*args, **kwargs)
        widths.append((args[0].shape[1], out.logits.shape[1]))
        return out

    expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    tiny_llama.forward = spy
    try:
        got = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        del tiny_llama.forward
    assert len(got) == len(expected) == len(requests)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, expected):
        assert lp == pytest.approx(lp_ref, abs=1e-4) and greedy == greedy_ref
    # The head ran on fewer positions than the batch held.
    assert widths and all(kept < width for width, kept in widths)


def test_importing_tasks_loads_neither_lm_eval_nor_datasets():
    import subprocess
    import sys

    code = "import sys, come.evaluation.tasks; print(sorted({'lm_eval', 'datasets', 'torch'} & set(sys.modules)))"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "[]"


def test_zero_shot_prints_no_git_noise(tiny_dir, tmp_path, monkeypatch, capfd):
    from come.engine.models import load_model
    from come.evaluation.tasks import zero_shot

    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's own `git describe` would print "fatal: ..."
    loaded = load_model(str(tiny_dir))
    result = zero_shot(loaded.model, loaded.tokenizer, tasks=["piqa"], limit=2, batch_size=2)
    assert result["tasks"]["piqa"]["n"] == 2
    assert "fatal" not in capfd.readouterr().err
