#!/usr/bin/env bash
# The method table of bench/results/smollm2_methods (issue: the default must be the best training-free
# compressor at every budget). Resumable: finished cells are skipped. Pass --report-only to write the
# table from the cells finished so far. Cells can be computed by several processes at once by giving
# each a subset of --methods/--ratios with the same --set options (a cell depends on the options its own method
# runs with, resolved). Every method runs with its own default calibration: come-search 128 x 128 tokens (16
# scored), the others 32 x 512; the ablations at 32 x 512 say so with --set. Ablations of the default (norefit, wide and kl at 0.2 only, the ratio where
# the default is closest to a baseline; wide costs an hour a cell): come-search-512 (the default before: 32 x 512
# calibration, 4 scored sequences), come-search-bi (the default before deletion candidates were ranked by skip
# error: 3 lowest-BI layers), come-search-norefit (that, without output refit), come-search-wide (every
# layer a deletion candidate, as in SLEB, and 8 scored sequences), come-search-kl (candidates scored by the
# divergence from the original model's next-token distribution instead of cross-entropy), come-search-mix (calibrated
# on wikipedia+lambada, half the windows from LAMBADA's calibration passages). sleb-layers deletes
# the layers SLEB chose at 0.2 (5, 12-18) without its 40-minute search, for a paired comparison with
# per-document scores (at 0.2 only: @0.2); sleb-layers+refit adds our refit to them. shortgpt+refit-s128
# gives ShortGPT + refit come-search's 128 x 128 calibration (is the calibration shape the gain?). Distilled cells (LABEL+distill) train the
# compressed model with the budget of recipes/smollm2-come-0.3.yaml: 131,072 tokens per merged layer,
# then 16 end-to-end steps of 4 x 512 (stage-1 merged layers, stage-2 merged layers at 2e-5 with hidden alignment, no LoRA:
# distill's defaults when the cells were made, now spelled out; the cells' settings were migrated to name them).
set -euo pipefail
exec come bench --out bench/results/smollm2_methods \
  --methods dense,come-search,come-search-512:come-search,come-search-bi:come-search,come-search-norefit:come-search@0.2,come-search-wide:come-search@0.2,come-search-kl:come-search@0.2,come-search-mix:come-search@0.2,come-paper:come,come-paper+refit:come,shortgpt,shortgpt+refit:shortgpt,sleb,sleb-layers:drop@0.2,sleb-layers+refit:drop@0.2,shortgpt+refit-s128:shortgpt@0.2,taylor+,replaceme,replaceme-cosine:replaceme,laco \
  --ratios 0.3,0.2,0.1 --limit 300 --ppl-max-tokens 32768 \
  --set come-search-512.nsamples=32 --set come-search-512.seqlen=512 --set come-search-512.search_samples=4 \
  --set come-search-bi.nsamples=32 --set come-search-bi.seqlen=512 --set come-search-bi.search_samples=4 \
  --set come-search-bi.search_deletion_rank=bi --set come-search-bi.search_deletions=3 \
  --set come-search-norefit.nsamples=32 --set come-search-norefit.seqlen=512 --set come-search-norefit.search_samples=4 \
  --set come-search-norefit.refit=false --set come-search-norefit.search_deletion_rank=bi --set come-search-norefit.search_deletions=3 \
  --set come-search-wide.nsamples=32 --set come-search-wide.seqlen=512 --set come-search-wide.search_samples=8 \
  --set come-search-wide.search_deletions=30 \
  --set come-paper.allow_remerge=false \
  --set come-paper+refit.allow_remerge=false --set come-paper+refit.refit=true \
  --set come-search-kl.nsamples=32 --set come-search-kl.seqlen=512 --set come-search-kl.search_samples=4 \
  --set come-search-kl.search_loss=kl \
  --set come-search-mix.calib=wikipedia+lambada \
  --set shortgpt+refit.refit=true --set sleb.search_samples=8 --set sleb-layers.drop_layers=[5,12,13,14,15,16,17,18] \
  --set sleb-layers+refit.drop_layers=[5,12,13,14,15,16,17,18] --set sleb-layers+refit.refit=true \
  --set shortgpt+refit-s128.refit=true --set shortgpt+refit-s128.nsamples=128 --set shortgpt+refit-s128.seqlen=128 \
  --set laco.merge_size=4 --set laco.search_samples=8 \
  --set replaceme-cosine.replaceme_objective=cosine \
  --distill come-search,come-paper,shortgpt \
  --distill-set tokens=131072 --distill-set global_steps=16 --distill-set batch_size=4 \
  --distill-set layers=merged --distill-set train=merged --distill-set global_lr=2e-5 --distill-set hidden_weight=1.0 \
  --distill-set lora=0 "$@"
