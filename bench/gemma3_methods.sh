#!/usr/bin/env bash
# Gemma-3-270M (built-in, 18 layers): dense vs come (paper), shortgpt, the default come-search (its default
# 128 x 128 calibration), come-search-512 (the default before: 32 x 512, 4 scored sequences), sleb.
# Perplexity only in the committed run (CPU budget); pass --tasks all --limit 300 for the zero-shot columns.
set -euo pipefail
exec come bench gemma3-270m --out bench/results/gemma3_methods \
  --methods dense,shortgpt,come-paper:come,come-search,come-search-512:come-search,sleb --ratios 0.1,0.05 --ppl-max-tokens 32768 \
  --set come-paper.allow_remerge=false --set sleb.search_samples=8 \
  --set come-search-512.nsamples=32 --set come-search-512.seqlen=512 --set come-search-512.search_samples=4 "$@"
