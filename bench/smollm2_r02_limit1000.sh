#!/usr/bin/env bash
# A precision check of the one comparison bench/smollm2_methods leaves open: at ratio 0.2 the default
# (come-search) against SLEB's layers (5, 12-18; `drop` replays SLEB's model bit for bit, without its
# 40-minute search) with and without our refit, on 1,000 documents per task instead of 300 (OpenBookQA
# has 500), with the dense model for reference. Same calibration as the method table. Resumable; --report-only writes the table.
set -euo pipefail
exec come bench --out bench/results/smollm2_r02_limit1000 \
  --methods dense,come-search,sleb-layers+refit:drop,sleb-layers:drop --ratios 0.2 --limit 1000 --ppl-max-tokens 32768 \
  --set 'sleb-layers.drop_layers=[5,12,13,14,15,16,17,18]' \
  --set 'sleb-layers+refit.drop_layers=[5,12,13,14,15,16,17,18]' --set sleb-layers+refit.refit=true "$@"
