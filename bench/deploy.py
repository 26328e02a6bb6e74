"""What a compressed model costs to deploy: file sizes and decode speed, dense vs compressed, measured in one run.

For a dense model (`--dense`: the built-in SmolLM2-135M unless given, e.g. `gemma3-270m` or a folder) and
a folder compressed from it (e.g. `runs/smollm2-come-0.3/distilled` written by
`come run recipes/smollm2-come-0.3.yaml`): the safetensors size, a GGUF per `--types`
(written with `come export-gguf`), greedy decode tokens/s in transformers (batch 1, float32, CPU),
and, when `llama-cpp-python` is importable, decode tokens/s of each GGUF in llama.cpp and whether
its greedy tokens equal transformers' for the prompt. Dense and compressed alternate `--repeats`
times so that a change of machine load hits both; the best run is reported.

    python bench/deploy.py runs/smollm2-come-0.3/distilled --types f16,q8_0 --results bench/results/deploy_smollm2
    python bench/deploy.py runs/gemma3-0.1 --dense gemma3-270m --results bench/results/deploy_gemma3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _results  # bench/ is on sys.path when a bench script runs
import torch

HERE = Path(__file__).resolve().parent
PROMPT = "The capital of France is"


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def hf_decode(folder: Path, new_tokens: int, repeats: int) -> tuple[float, list[int], list[int]]:
    """(best tokens/s, greedy continuation, the prompt's ids as transformers' tokenizer gives them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    best = 0.0
    with torch.no_grad():
        # The greedy continuation (stops at the end of sequence), then the timing at a fixed length.
        tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            best = max(best, new_tokens / (time.perf_counter() - start))
    return best, tokens, ids[0].tolist()


def llama_cpp_decode(gguf: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> tuple[float, list[int]]:
    """(best tokens/s, greedy continuation) of `prompt`: the same ids transformers was given (its tokenizer
    adds a BOS for Gemma and none for SmolLM2), so that the two continuations can be compared token by token."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=threads, verbose=False, seed=0)
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):  # greedy, to the end of sequence
        tokens.append(int(token))
        if len(tokens) == new_tokens or token == llm.token_eos():
            break
    best = 0.0
    for _ in range(repeats):  # timing at a fixed length: past the end of sequence, like min_new_tokens
        count, start = 0, time.perf_counter()
        for _token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            count += 1  # noqa: SIM113 (counts tokens up to a break)
            if count == new_tokens:
                break
        best = max(best, new_tokens / (time.perf_counter() - start))
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compressed", help="a folder written by come (compress, distill or a recipe stage)")
    parser.add_argument("--dense", default=None, help="the model it was compressed from: a folder or a built-in name "
                        "(default: the built-in SmolLM2-135M)")
    parser.add_argument("--types", default="f16,q8_0", help="GGUF types to export and time, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/come-deploy", help="where the GGUF files are written")
    parser.add_argument("--results", default=str(HERE / "results" / "deploy_smollm2"))
    args = parser.parse_args()

    from come.artifacts.gguf_export import export_gguf
    from come.engine.models import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dense_model = load_model(args.dense)
    dense = Path(dense_model.source["path"])  # a built-in model's cached folder
    title = dense_model.model.config.name_or_path and Path(dense_model.model.config.name_or_path).name or dense.name
    del dense_model
    models = {"dense": dense, "compressed": Path(args.compressed).resolve()}
    types = [t for t in args.types.split(",") if t]
    threads = torch.get_num_threads()
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None

    rows = {}
    for name, folder in models.items():
        config = json.loads((folder / "config.json").read_text())
        rows[name] = {"folder": str(folder), "layers": config["num_hidden_layers"],
                      "safetensors_bytes": folder_bytes(folder), "gguf": {}}
        for qtype in types:
            file = work / f"{name}-{qtype}.gguf"
            export_gguf(folder, file, qtype, overwrite=True, progress=False)
            rows[name]["gguf"][qtype] = {"bytes": file.stat().st_size, "file": str(file)}
    for name in models:  # timing after every export, alternating dense and compressed per repeat below
        rows[name]["hf_tokens_per_s"] = 0.0
    for _ in range(args.repeats):
        for name, folder in models.items():
            speed, tokens, prompt = hf_decode(folder, args.new_tokens, 1)
            rows[name]["hf_tokens_per_s"] = max(rows[name]["hf_tokens_per_s"], speed)
            rows[name]["hf_tokens"] = tokens
            if llama_version:
                for qtype, entry in rows[name]["gguf"].items():
                    speed, cpp_tokens = llama_cpp_decode(Path(entry["file"]), prompt, args.new_tokens, 1, threads)
                    entry["llama_cpp_tokens_per_s"] = max(entry.get("llama_cpp_tokens_per_s", 0.0), speed)
                    entry["same_greedy_tokens_as_hf"] = cpp_tokens == tokens
                    entry["first_divergence"] = next((i for i, (a, b) in enumerate(zip(cpp_tokens, tokens)) if a != b),
                                                     None)
            print(f"{name}: transformers {rows[name]['hf_tokens_per_s']:.1f} tok/s", flush=True)

    command = _results.command_line()
    mib = 1024 * 1024
    lines = [
        f"# Deployment cost: dense vs compressed {title} (sizes, decode speed; one run)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_results.machine(threads, llama_cpp_python=llama_version or 'not installed')}.  ",
        f"Decode: greedy, batch 1, prompt {PROMPT!r}, {args.new_tokens} new tokens, best of {args.repeats} "
        "(dense and compressed alternate). transformers runs float32 safetensors.",
        "",
        "| model | layers | safetensors MiB | " + " | ".join(f"GGUF {t} MiB" for t in types)
        + " | transformers tok/s | " + " | ".join(f"llama.cpp {t} tok/s" for t in types) + " |",
        "|---|---|---|" + "---|" * len(types) + "---|" + "---|" * len(types),
    ]
    for name, row in rows.items():
        sizes = " | ".join(f"{row['gguf'][t]['bytes'] / mib:.1f}" for t in types)
        cpp = " | ".join(
            (f"{row['gguf'][t]['llama_cpp_tokens_per_s']:.1f}" + ("" if row['gguf'][t]['same_greedy_tokens_as_hf']
                                                                 else f" (differs at token {row['gguf'][t]['first_divergence']})"))
            if "llama_cpp_tokens_per_s" in row["gguf"][t] else "-" for t in types)
        lines.append(f"| {name} | {row['layers']} | {row['safetensors_bytes'] / mib:.1f} | {sizes} | "
                     f"{row['hf_tokens_per_s']:.1f} | {cpp} |")
    lines += ["", "`(differs at token i)`: llama.cpp's greedy tokens differ from transformers' from position i "
              "(expected for quantised types; f16 should match)."]
    _results.write(args.results, lines, data={"command": command, "rows": rows})


if __name__ == "__main__":
    main()
