"""Compressing a model bigger than one wants to hold: layer-wise vs in-memory `come compress`.

Writes a synthetic Llama checkpoint with random weights (default ~1.55B
parameters, 6.2 GB in float32) as sharded safetensors, one layer at a time so
the model is never in memory here either, then runs `come compress` as child
processes, each measured on its own (wall time, and peak RSS from the OS via
wait4):

  (a) peak RSS of layer-wise vs in-memory mode, against the size of the weights;
  (b) time of the progressive loop with boundary caching (the default) vs
      rerunning every layer after each merge (--no-incremental), plans checked identical;
  (c) layer-wise and in-memory under a hard address-space cap (RLIMIT_AS) below the
      size of the weights (--cap-fraction 0 skips it).

Results: <results>.md and <results>.csv, with the command that made them.

    python bench/scale.py                                   # the real run (~20 min on 2 CPUs)
    python bench/scale.py --layers 4 --hidden 256 --intermediate 512 --heads 8 --kv-heads 4 \\
        --results /tmp/scale-tiny                           # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _results  # bench/ is on sys.path when a bench script runs
import torch

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- the synthetic checkpoint ---------------------------------------------------
def spec_of(args) -> dict:
    return {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "dtype", "seed")}


def write_checkpoint(folder: Path, args) -> dict:
    """A random-weight Llama as one safetensors shard per layer (plus embeddings, plus norm and head).

    Only one layer's tensors exist at a time. Reused if `folder` already holds the same spec.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from come.engine.models import default_gguf_path

    spec = spec_of(args)
    marker = folder / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return json.loads((folder / "config.json").read_text())
    gguf = default_gguf_path()  # the SmolLM2 tokenizer, read from the GGUF (no model loaded)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dtype = DTYPES[args.dtype]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype=args.dtype,
        architectures=["LlamaForCausalLM"],
    )
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(args.seed)

    def normal(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    h, i, hd = args.hidden, args.intermediate, args.hidden // args.heads
    kv = args.kv_heads * hd

    def layer(k):
        p = f"model.layers.{k}."
        return {
            p + "self_attn.q_proj.weight": normal(h, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, h),
            p + "mlp.gate_proj.weight": normal(i, h),
            p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        }

    groups = (
        [lambda: {"model.embed_tokens.weight": normal(config.vocab_size, h)}]
        + [lambda k=k: layer(k) for k in range(args.layers)]
        + [lambda: {"model.norm.weight": torch.ones(h, dtype=dtype), "lm_head.weight": normal(config.vocab_size, h)}]
    )
    weight_map, total = {}, 0
    for n, make in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = make()
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "bench_spec.json").write_text(json.dumps(spec))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return json.loads((folder / "config.json").read_text())


def weight_stats(folder: Path) -> tuple[int, int]:
    """(parameters, bytes) of a checkpoint folder, from the safetensors headers."""
    from safetensors import safe_open

    params = size = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                piece = f.get_slice(key)
                n = 1
                for d in piece.get_shape():
                    n *= d
                params += n
                size += n * {"F32": 4, "F16": 2, "BF16": 2}.get(piece.get_dtype(), 4)
    return params, size


# -- measured runs --------------------------------------------------------------
def run_measured(cmd: list[str], cap_bytes: int | None, env: dict) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MiB) of one child, optionally under RLIMIT_AS."""

    def limit():
        if cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, preexec_fn=limit, env=env)  # noqa: PLW1509 (single-threaded parent)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024


def idle_process(env: dict) -> tuple[int, float]:
    """(peak virtual size in bytes, peak RSS in MiB) of a child that only imports torch, transformers and come."""
    code = "import torch, transformers, come.cli; print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0].split()[1])"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    vm = proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)
    return int(vm) * 1024, usage.ru_maxrss / 1024


def same_weights(a: Path, b: Path) -> float | None:
    """Largest absolute difference between two checkpoint folders, tensor by tensor (None: different names)."""
    from safetensors import safe_open

    def files(folder):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}  # noqa: SIM118

    fa, fb = files(a), files(b)
    if fa.keys() != fb.keys():
        return None
    worst = 0.0
    for key in fa:
        with safe_open(fa[key], framework="pt") as x, safe_open(fb[key], framework="pt") as y:
            worst = max(worst, (x.get_tensor(key).float() - y.get_tensor(key).float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights on disk and in the runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--method", default="come")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cap-fraction", type=float, default=0.75,
                        help="(c) address-space cap as a fraction of the weights' size; 0 skips the capped runs")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "come" / "bench-scale"))
    parser.add_argument("--results", default=str(HERE / "results" / "scale"), help="writes RESULTS.md and RESULTS.csv")
    parser.add_argument("--keep", action="store_true", help="keep the compressed outputs")
    args = parser.parse_args()

    work = Path(args.workdir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    name = f"llama-synthetic-{args.layers}x{args.hidden}-{args.dtype}"
    model_dir = work / name
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    t0 = time.perf_counter()
    write_checkpoint(model_dir, args)
    write_seconds = time.perf_counter() - t0
    params, weight_bytes = weight_stats(model_dir)
    print(f"checkpoint {model_dir}: {params / 1e9:.3f}B parameters, {weight_bytes / 2**30:.2f} GiB ({write_seconds:.0f} s)", flush=True)

    base = [sys.executable, "-m", "come.cli", "compress", str(model_dir), "--ratio", str(args.ratio),
            "--method", args.method, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--dtype", args.dtype, "--device", args.device, "--overwrite", "-q"]
    cap = int(args.cap_fraction * weight_bytes) if args.cap_fraction > 0 else None
    cap_note = ""
    idle, idle_rss = idle_process(env)
    if cap is not None and cap < idle + 2**30:
        cap_note = (f"capped runs skipped: {args.cap_fraction} x the weights is {cap / 2**30:.2f} GiB, below the "
                    f"address space of an idle python+torch process ({idle / 2**30:.2f} GiB) + 1 GiB")
        cap = None
    runs = [
        ("layerwise", ["--layerwise"], None),
        ("layerwise, no boundary caching", ["--layerwise", "--no-incremental"], None),
        ("in-memory", [], None),
    ]
    if cap is not None:
        runs += [("layerwise, capped", ["--layerwise"], cap), ("in-memory, capped", [], cap)]

    rows = []
    for label, extra, limit in runs:
        out = work / ("out-" + label.replace(", ", "-").replace(" ", "-"))
        cmd = base + extra + ["--out", str(out)]
        print(f"== {label}: {shlex.join(cmd)}" + (f" (RLIMIT_AS {limit / 2**30:.2f} GiB)" if limit else ""), flush=True)
        code, wall, rss = run_measured(cmd, limit, env)
        plan = json.loads((out / "come_plan.json").read_text()) if code == 0 else None
        execution = plan["execution"] if plan else {}
        rows.append({
            "run": label,
            "cap_gib": round(limit / 2**30, 2) if limit else "",
            "exit": code,
            "wall_s": round(wall, 1),
            "method_s": execution.get("method_seconds", ""),
            "peak_rss_gib": round(rss / 1024, 3),
            "gpu_peak_gib": execution.get("gpu_peak_gib", ""),
            "rss_vs_weights": round(rss * 2**20 / weight_bytes, 3),
            "layers_run": execution.get("layers_run", ""),
            "layer_loads": execution.get("layer_loads", ""),
            "activations": execution.get("activations", ""),
            "final_layers": plan["final_layers"] if plan else "",
            "_plan": plan,
            "_out": out,
        })
        print(f"   exit {code}, {wall:.1f} s, peak RSS {rss / 1024:.2f} GiB", flush=True)

    reference = rows[0]["_plan"]
    for row in rows:
        plan = row.pop("_plan")
        row["same_plan"] = "" if plan is None or reference is None else (
            plan["layers"] == reference["layers"] and plan["steps"] == reference["steps"])
    mem = next((r for r in rows if r["run"] == "in-memory" and r["exit"] == 0), None)
    max_diff = same_weights(rows[0]["_out"], mem["_out"]) if mem and rows[0]["exit"] == 0 else None
    for row in rows:
        out = row.pop("_out")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    columns = list(rows[0])
    by = {r["run"]: r for r in rows}
    inc, full = by["layerwise"], by["layerwise, no boundary caching"]
    lines = [
        "# Layer-wise vs in-memory compression",
        "",
        f"Command: `{_results.command_line()}`",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", OMP_NUM_THREADS={args.threads}" if args.threads else "") + f", device {args.device}.",
        f"Model: synthetic Llama (random weights), {args.layers} layers, hidden {args.hidden}, FFN {args.intermediate}, "
        f"{args.heads} heads / {args.kv_heads} KV heads, {params / 1e9:.3f}B parameters, "
        f"**{weight_bytes / 2**30:.2f} GiB** of {args.dtype} weights in {args.layers + 2} shards.",
        f"Compression: `{args.method}`, ratio {args.ratio}, calibration {args.nsamples} x {args.seqlen} tokens (wikipedia).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows),
        "",
        "- wall_s: the whole child (load, calibration, method, export); method_s: calibration passes, scores "
        "and merges only; layers_run: decoder-layer passes over the calibration set; layer_loads: layers read "
        "from the checkpoint or the merged-layer store (layer-wise only).",
        f"- (a) peak RSS: layer-wise {inc['peak_rss_gib']} GiB, in-memory {by['in-memory']['peak_rss_gib']} GiB, "
        f"weights {weight_bytes / 2**30:.2f} GiB; a process that only imports torch, transformers and come "
        f"peaks at {idle_rss / 1024:.2f} GiB RSS.",
        f"- (b) boundary caching: method time {inc['method_s']} s vs {full['method_s']} s rerunning every layer "
        f"({inc['layers_run']} vs {full['layers_run']} layer passes); same plan: {full['same_plan']}.",
        f"- layer-wise vs in-memory output weights: largest absolute difference {max_diff}; same plan: "
        f"{by['in-memory']['same_plan']}.",
    ]
    if cap is not None:
        lines.append(f"- (c) under RLIMIT_AS = {cap / 2**30:.2f} GiB ({args.cap_fraction} x the weights; it caps virtual "
                     "address space, which counts mapped files and allocator reservations, so it is stricter than RSS): "
                     f"layer-wise exit {by['layerwise, capped']['exit']}, in-memory exit {by['in-memory, capped']['exit']}.")
    elif cap_note:
        lines.append(f"- (c) {cap_note}.")
    _results.write(args.results, lines, rows=rows)


if __name__ == "__main__":
    main()
