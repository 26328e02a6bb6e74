#!/usr/bin/env bash
# Gemma-3-270M with the zero-shot columns (7 tasks x 300 documents, lm-eval stderrs) at ratio 0.05: dense vs
# the default come-search (its 128 x 128 calibration) and shortgpt (= sleb's layers at 0.05). About 15
# CPU-minutes per model on 2 cores, run one process at a time. Resumable; --report-only writes the table.
set -euo pipefail
exec come bench gemma3-270m --out bench/results/gemma3_zeroshot \
  --methods dense,shortgpt,come-search --ratios 0.05 --ppl-max-tokens 32768 --tasks all --limit 300 \
  --set come-search.nsamples=128 --set come-search.seqlen=128 --set come-search.search_samples=16 "$@"
