#!/usr/bin/env bash
# Gemma-3-270M with the zero-shot columns (7 tasks x 300 documents, lm-eval stderrs) at ratios 0.05 and 0.1:
# dense vs the default come-search (its 128 x 128 calibration), shortgpt, the paper's CoMe and sleb (at 0.1
# only: at 0.05 it deletes ShortGPT's layers, bench/results/gemma3_methods). About 15 CPU-minutes per model
# on 2 cores, run one process at a time. Resumable; --report-only writes the table.
set -euo pipefail
exec come bench gemma3-270m --out bench/results/gemma3_zeroshot \
  --methods dense,shortgpt,come-search,come-paper:come,sleb@0.1 --ratios 0.05,0.1 --ppl-max-tokens 32768 \
  --tasks all --limit 300 --set come-paper.allow_remerge=false --set sleb.search_samples=8 "$@"
