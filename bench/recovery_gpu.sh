#!/usr/bin/env bash
# Recovery with a real budget on one GPU: compress SmolLM2-135M at 0.3 with the default, distil end to end on
# >= 20M training tokens (full weights, the held-out check every 200 steps keeps the best), then evaluate both.
# Meant for a lent GPU machine (one H200: to fit in 10 minutes); writes bench/results/recovery_gpu.md.
#
#   bash bench/recovery_gpu.sh [OUT_DIR]
#
# The built-in Wikipedia calibration split holds about 0.6M tokens, so 20M tokens are ~40 passes over 512k of
# them (seeded, reshuffled each pass); the held-out windows stay disjoint from them, and the kept checkpoint is
# the one with the lowest held-out KL, so over-fitting shows up there instead of in the output.
#
# Every setting is an environment variable, so the same script runs as a smoke test on a CPU and a tiny model
# (tests/cli/test_recovery_gpu_script.py): MODEL (a model folder; default: the built-in SmolLM2-135M), DEVICE,
# NSAMPLES/CALIB_SEQLEN (compress calibration), STEPS, BATCH, TOKENS, SEQLEN, LR, EVAL_EVERY, HELDOUT (distil),
# TASKS, LIMIT, PPL_TOKENS, EVAL_SEQLEN (eval), RESULTS (the Markdown written at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
MODEL=${MODEL:-}
DEVICE=${DEVICE:-cuda}
NSAMPLES=${NSAMPLES:-128}
CALIB_SEQLEN=${CALIB_SEQLEN:-128}
STEPS=${STEPS:-1220}          # 1220 steps x 32 x 512 = 20.0M tokens
BATCH=${BATCH:-32}
TOKENS=${TOKENS:-524288}
SEQLEN=${SEQLEN:-512}
LR=${LR:-1e-4}
EVAL_EVERY=${EVAL_EVERY:-200}
HELDOUT=${HELDOUT:-32768}
TASKS=${TASKS:-all}
LIMIT=${LIMIT:-300}
PPL_TOKENS=${PPL_TOKENS:-32768}
EVAL_SEQLEN=${EVAL_SEQLEN:-512}
RESULTS=${RESULTS:-bench/results/recovery_gpu.md}
mkdir -p "$OUT"
start=$(date +%s)
if [ ! -f "$OUT/c03/come_plan.json" ]; then
  come compress ${MODEL:+"$MODEL"} --ratio 0.3 --out "$OUT/c03" --device "$DEVICE" --nsamples "$NSAMPLES" \
    --seqlen "$CALIB_SEQLEN" --overwrite -q
fi
t_compress=$(( $(date +%s) - start ))
come distill "$OUT/c03" --out "$OUT/c03-distilled" --device "$DEVICE" --tokens "$TOKENS" --seqlen "$SEQLEN" \
  --global-steps "$STEPS" --batch-size "$BATCH" --lora 0 --global-lr "$LR" --eval-every "$EVAL_EVERY" \
  --heldout-tokens "$HELDOUT" --overwrite -q
t_distill=$(( $(date +%s) - start - t_compress ))
for m in c03 c03-distilled; do
  come eval "$OUT/$m" --ppl wikipedia,lambada --max-tokens "$PPL_TOKENS" --seqlen "$EVAL_SEQLEN" --tasks "$TASKS" \
    --limit "$LIMIT" --device "$DEVICE" --json "$OUT/$m-eval.json" -q
done
python - "$OUT" "$t_compress" "$t_distill" "$RESULTS" "$DEVICE" "${MODEL:-SmolLM2-135M}" <<'EOF'
import json, os, sys, tempfile
out, tc, td, results, device, model = sys.argv[1:7]
def cell(value, fmt):
    return "-" if value is None else format(value, fmt)
rows = []
for m in ("c03", "c03-distilled"):
    e = json.load(open(f"{out}/{m}-eval.json"))
    kl = (e.get("fidelity") or {}).get("wikipedia", {}).get("kl")
    zs = e.get("zero_shot")
    acc = f"{zs['average']:.4f} ± {zs['average_stderr']:.4f}" if zs else "-"
    rows.append(f"| {m} | {cell(kl, '.4f')} | {e['perplexity']['wikipedia']['ppl']:.2f} | "
                f"{e['perplexity']['lambada']['ppl']:.2f} | {acc} |")
record = json.load(open(f"{out}/c03-distilled/come_plan.json"))["distillation"]
sel, tokens = record["selection"], (record["stage2"] or {}).get("tokens", 0)
text = [f"# Recovery on one GPU: {model} at 0.3", "",
        "Command: `bash bench/recovery_gpu.sh`" + (f" (DEVICE={device}, MODEL={model})" if device != "cuda" else "") + "  ",
        f"Compress {tc} s, distil {td} s on {tokens:,} training tokens (kept: {sel['chosen']}, "
        f"held-out KL {sel['kl_before']:.4f} -> {sel['kl_after']:.4f}).", "",
        "| model | wiki KL to dense | wiki ppl | lambada ppl | avg acc |", "|---|---|---|---|---|", *rows]
folder = os.path.dirname(os.path.abspath(results))
os.makedirs(folder, exist_ok=True)
with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:  # no half-written table
    f.write("\n".join(text) + "\n")
os.replace(f.name, results)
print("\n".join(text))
EOF
