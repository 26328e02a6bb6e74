"""Scoring through lm-evaluation-harness: our offline `come_<task>` tasks (or lm-eval's own, online)
run on an in-memory model, reported per task under the standard task names.

The task YAMLs (`come_<task>.yaml`, next to this file) replicate lm-eval's standard ones and
read the JSONL that `data.export_offline_data` writes. lm-eval is imported only when used: it is slow.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from ...outputs import atomic_write_text
from .data import PAPER_TASKS, SPLIT, SPLIT_NOTES, cache_root, export_offline_data

# The paper averages acc_norm where lm-eval reports it for these tasks, acc elsewhere.
AVERAGE_METRIC = {
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "boolq": "acc",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "piqa": "acc",
    "winogrande": "acc",
}

_TASKS_DIR = Path(__file__).resolve().parent
_OFFLINE_PREFIX = "come_"  # distinct from lm-eval's own task names, which it also indexes when online


def offline_task_name(task: str) -> str:
    return _OFFLINE_PREFIX + task


def task_manager(cache_dir: str | os.PathLike | None = None, include_defaults: bool = False):
    """A TaskManager that knows our offline tasks `come_<task>`, reading the exported JSONL.

    For each packaged YAML we write <cache>/lm_eval_tasks/come_<task>.yaml that `include`s it
    by absolute path (so its `!function utils.*` still resolves next to the package) and adds
    the runtime `data_files` (rewritten whenever the package or cache moves). lm-eval's own
    thousands of tasks are indexed only with include_defaults, which is much slower.
    """
    from lm_eval.tasks import TaskManager

    data_dir = export_offline_data(cache_dir)
    yaml_dir = cache_root(cache_dir) / "lm_eval_tasks"
    for task in PAPER_TASKS:
        name = offline_task_name(task)
        config = {
            "include": str(_TASKS_DIR / f"{name}.yaml"),
            "task": name,
            "dataset_kwargs": {
                "data_files": {SPLIT[task]: str(data_dir / f"{task}.jsonl")},
                # Keep datasets' Arrow conversion next to our data, not in ~/.cache/huggingface.
                "cache_dir": str(cache_root(cache_dir) / "hf_datasets"),
            },
        }
        text = json.dumps(config, indent=2) + "\n"  # JSON is valid YAML and needs no yaml dependency
        path = yaml_dir / f"{name}.yaml"
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text, what="cache")
    return TaskManager(include_path=str(yaml_dir), include_defaults=include_defaults)


def _metric(task_results: dict, name: str) -> float | None:
    value = task_results.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None  # stderr may be "N/A"


def _evaluate(lm, harness_names: dict, limit, manager, seed: int) -> dict:
    """What lm-eval's `simple_evaluate(model=lm, num_fewshot=0, log_samples=True, ...)` computes, through
    its public lower-level `evaluate`: the same seeds, task set-up and scoring, without what
    simple_evaluate adds around the results (an environment report, and the `git describe` of the
    working folder, which lets git print "fatal: not a git repository" outside one)."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    if not harness_names:
        raise ValueError("No tasks specified, or no tasks found. Please verify the task names.")  # as simple_evaluate
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loaded = manager.load(list(harness_names.values()))
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)  # zero-shot
        task.set_fewshot_seed(seed=seed)
    return evaluate(
        lm=lm,
        task_dict=loaded,
        limit=limit,
        log_samples=True,  # per-document scores: paired comparisons of two models on the same documents
        fewshot_as_multiturn=True,  # simple_evaluate's value (it matters only with a chat template)
    )


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] = PAPER_TASKS,
    limit: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    offline: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Zero-shot lm-eval scores of an in-memory HF causal LM.

    offline=True scores our `come_<task>` copies (paper tasks only); offline=False scores
    lm-eval's standard hub tasks by name (any task lm-eval knows). `limit` caps docs per task
    (first N of the split, as lm-eval's --limit).
    """
    from lm_eval.tasks import TaskManager

    from .scoring_lm import continuation_lm_class

    tasks = list(tasks)
    if offline:
        unknown = sorted(set(tasks) - set(PAPER_TASKS))
        if unknown:
            raise ValueError(f"no offline copy of {unknown}; offline tasks are {PAPER_TASKS}")
        manager = task_manager(cache_dir)
        harness_names = {task: offline_task_name(task) for task in tasks}
    else:
        manager = TaskManager()
        harness_names = {task: task for task in tasks}

    # HFLM, with the LM head computed only where continuations are scored (same numbers, less work).
    lm = continuation_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = _evaluate(lm, harness_names, limit, manager, seed)

    per_task = {}
    for task, harness_name in harness_names.items():
        scores = output["results"][harness_name]
        per_task[task] = {
            "acc": _metric(scores, "acc"),
            "acc_norm": _metric(scores, "acc_norm"),  # None where lm-eval has no acc_norm (boolq, winogrande)
            "acc_stderr": _metric(scores, "acc_stderr"),
            "acc_norm_stderr": _metric(scores, "acc_norm_stderr"),
            "n": int(output["n-samples"][harness_name]["effective"]),
            "average_metric": AVERAGE_METRIC.get(task, "acc"),
        }
        metric = per_task[task]["average_metric"]
        samples = sorted(output.get("samples", {}).get(harness_name, []), key=lambda s: s["doc_id"])
        if samples and all(metric in s for s in samples):
            per_task[task]["per_doc"] = [float(s[metric]) for s in samples]
    averaged = [per_task[t][per_task[t]["average_metric"]] for t in tasks]
    errors = [per_task[t][f"{per_task[t]['average_metric']}_stderr"] for t in tasks]
    return {
        "tasks": per_task,
        "average": math.fsum(averaged) / len(averaged) if None not in averaged else None,
        # Tasks are independent samples: the mean's standard error is sqrt(sum se^2) / n.
        "average_stderr": math.sqrt(math.fsum(e * e for e in errors)) / len(errors) if None not in errors else None,
        "average_metric": {t: per_task[t]["average_metric"] for t in tasks},
        "limit": limit,
        "offline": offline,
        "seed": seed,
        "split_notes": {t: SPLIT_NOTES[t] for t in tasks if t in SPLIT_NOTES} if offline else {},
        "lm_eval_version": importlib.metadata.version("lm_eval"),
    }
