#!/usr/bin/env bash
# The first thing to run on a lent GPU machine (one H100, no network): under 8 minutes in all, three steps, each
# with its own timeout and timing. How to call it through the device tool, and what to carry: docs/gpu-check.md.
#
#   1. the Triton kernels' tests compiled for the GPU (TRITON_INTERPRET=0; tests/conftest.py sets the interpreter
#      only where there is no CUDA), contiguous and paged caches, the half-precision generate test, and the bench's
#      small GPU case;
#   2. `dashkv bench --device cuda`: llama3-8b shapes, bf16, 32k and 128k, the shipped encoders' config:
#      the Triton decode kernels against SDPA (results.json, results.md, latency.png);
#   3. a vLLM GPU smoke with DASH-KV: only where vLLM imports AND the plugin has a CUDA backend; else it says why
#      it was skipped (today the plugin overrides CPU_ATTN only: docs/vllm-plan.md §6).
#
# Everything goes under ${OUT:-./gpu-check-out}: gpu-check.log, summary.md, bench/ (at most 8 files, 2 folders deep).
# GPU_CHECK_DRY=1 prints each step's command instead of running it (to check the script on a machine without a GPU).
# The script goes on after a failed step and exits non-zero at the end if any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=${GPU_CHECK_DRY:-0}
OUT_DIR=${OUT:-./gpu-check-out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu-check.log
SUMMARY=$OUT_DIR/summary.md
exec > >(tee -a "$LOG") 2>&1

PY=${PYTHON:-python3}   # on the lent machines, python3 is the one that holds PyTorch
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=0
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # hf_dashkv from this tree, not installed
T_TESTS=${GPU_CHECK_T_TESTS:-150} T_BENCH=${GPU_CHECK_T_BENCH:-220} T_VLLM=${GPU_CHECK_T_VLLM:-60}
START=$SECONDS
FAILED=()

echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    | tee "$SUMMARY"

# ---- the machine ------------------------------------------------------------------------------------------------
echo "== machine"
if [[ $DRY == 1 ]]; then
    echo "[dry] nvidia-smi -L; $PY -c 'versions of torch, triton, transformers, numba, ...'"
else
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L | tee -a "$SUMMARY"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$SUMMARY"
    else
        echo "nvidia-smi: not on the PATH"
    fi
fi

# ---- missing packages: only from carried wheels (.whl/), never the network ------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels: $(ls .whl)"
    if [[ $DRY == 1 ]]; then
        echo "[dry] $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl"
    else
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    export PYTHONPATH="$PYTHONPATH:/tmp/site"   # after the image's own packages: carried wheels only fill gaps
else
    echo "== no .whl/ folder carried: using the machine's packages as they are"
fi

VERSIONS=$(cat <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "transformers", "numba", "numpy", "pytest", "hypothesis", "peft", "matplotlib",
             "vllm"):
    try:
        module = importlib.import_module(name)
        print(f"{name:<13}", getattr(module, "__version__", "installed"))
    except Exception as error:  # vllm is missing on the lent machines: step 3 says what that costs
        print(f"{name:<13} MISSING ({type(error).__name__}: {str(error)[:80]})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "-")
EOF
)
if [[ $DRY == 1 ]]; then
    echo "[dry] $PY -c <versions>"
else
    $PY -c "$VERSIONS" | tee -a "$SUMMARY"
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device visible to PyTorch: nothing below would measure the GPU; stopping." | tee -a "$SUMMARY"
        exit 2
    fi
fi

# step NAME TIMEOUT_S COMMAND...: runs it under `timeout`, prints and records its time and exit status
step() {
    local name=$1 limit=$2 rc=0 t0=$SECONDS
    shift 2
    echo
    echo "== $name (timeout ${limit}s): $*"
    if [[ $DRY == 1 ]]; then
        echo "[dry] timeout --kill-after=10 $limit $*"
    else
        timeout --kill-after=10 "$limit" "$@" || rc=$?
    fi
    local took=$((SECONDS - t0)) verdict=ok
    if [[ $DRY == 1 ]]; then verdict="not run (dry)"; elif ((rc == 124 || rc == 137)); then verdict="TIMED OUT"; elif ((rc != 0)); then verdict="FAILED (rc $rc)"; fi
    ((rc == 0)) || FAILED+=("$name")
    echo "== $name: $verdict in ${took}s"
    echo "- $name: $verdict in ${took}s" >>"$SUMMARY"
}

# ---- 1. the Triton paths, compiled ------------------------------------------------------------------------------
# test_triton_kernels.py: every kernel test on CUDA tensors (the interpreter-only generate test skips itself), plus
# the ahead-of-time sm_90 compile; test_triton_paged.py: the same kernels over paged caches (block tables) against
# the paged reference, and each launch on its tensors' device; test_sparse_generate.py -k half: fp16 picks the torch
# backend when not interpreting; test_bench.py: one small bench case on the GPU with the Triton kernels.
step "1 triton tests (compiled)" "$T_TESTS" \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/hf_dashkv/test_triton_kernels.py tests/hf_dashkv/test_triton_paged.py \
    "tests/hf_dashkv/test_sparse_generate.py::test_half_precision_caches_decode_sparsely_as_the_definition_does" \
    "tests/hf_dashkv/apps/test_bench.py::test_a_small_case_runs_on_the_gpu_with_the_triton_kernels"

# ---- 2. the bench on the GPU ------------------------------------------------------------------------------------
# `dashkv` is the console script of an installed package; here the tree is not installed, so the module is run.
# --generate-contexts with no value: end-to-end generate runs on CPU only and is skipped.
step "2 dashkv bench --device cuda 32k 128k" "$T_BENCH" \
    "$PY" -m hf_dashkv.apps.cli bench --device cuda --shapes llama3-8b --dtypes bf16 --contexts 32k 128k \
    --configs shipped --no-whole-step --generate-contexts --out-dir "$OUT_DIR/bench"
if [[ -f $OUT_DIR/bench/results.md ]]; then
    { echo; echo "## bench (llama3-8b, bf16, shipped config)"; echo; cat "$OUT_DIR/bench/results.md"; } >>"$SUMMARY"
fi

# ---- 3. vLLM GPU smoke with DASH-KV ------------------------------------------------------------------------------
echo
SKIP=""
if ! grep -q "CUDA_BACKEND" hf_dashkv/vllm/plugin.py; then
    # the plugin registers a backend for CPU_ATTN only; a GPU version would set plugin.CUDA_BACKEND (a CUSTOM one)
    SKIP="the plugin has no CUDA backend yet (docs/vllm-plan.md §6)"
fi
if [[ $DRY != 1 ]] && ! $PY -c "import vllm" >/dev/null 2>&1; then
    SKIP="${SKIP:+$SKIP; }vLLM is not installed here (it cannot travel: far over the 64 MiB a call carries)"
fi
if [[ -n $SKIP ]]; then
    echo "vLLM GPU smoke: skipped — $SKIP" | tee -a "$SUMMARY"
else
    # stock vs DASH-KV with a budget covering every context, tiny random Llama: the tokens must be equal
    SMOKE=$(cat <<'EOF'
import json, os, subprocess, sys, tempfile
from hf_dashkv.policy import DecodePolicy
tmp = tempfile.mkdtemp()
model, encoders = f"{tmp}/tiny-llama", f"{tmp}/encoders"
plain = {"model": model, "prompts": [list(range(1, 41)), list(range(5, 75))], "max_tokens": 12}
covering = {**plain, "dashkv": {"encoders": encoders,
                                "policy": DecodePolicy(budget=10_000, sink_tokens=4, recent_tokens=8).to_dict()}}
def selftest(name, runs, plugins=None, **spec):
    out = f"{tmp}/{name}.json"
    with open(f"{tmp}/{name}-spec.json", "w") as f:
        json.dump({"out": out, "runs": runs, **spec}, f)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    subprocess.run([sys.executable, "-m", "hf_dashkv.vllm.selftest", f"{tmp}/{name}-spec.json"], env=env, check=True)
    return json.load(open(out))["runs"]
(stock,) = selftest("stock", [plain], plugins="", tiny=model)
(dashkv,) = selftest("dashkv", [covering], tiny=model,
                     random_encoders={"folder": encoders, "model": model, "bits": 32})
print("stock impls", stock["impls"], "DASH-KV impls", dashkv["impls"], "layers", dashkv["dashkv_layers"])
assert dashkv["dashkv_layers"], "no layer carries DASH-KV state"
assert dashkv["tokens"] == stock["tokens"], (stock["tokens"], dashkv["tokens"])
print("vLLM GPU smoke: DASH-KV with a covering budget gives stock vLLM's tokens")
EOF
)
    step "3 vLLM GPU smoke (DASH-KV = stock at a covering budget)" "$T_VLLM" "$PY" -c "$SMOKE"
fi

# ---- done -------------------------------------------------------------------------------------------------------
echo
echo "== total $((SECONDS - START))s; results in $OUT_DIR: $(cd "$OUT_DIR" && find . -type f | sort | tr '\n' ' ')"
echo "- total: $((SECONDS - START))s" >>"$SUMMARY"
if ((${#FAILED[@]})); then
    echo "failed: ${FAILED[*]}" | tee -a "$SUMMARY"
    exit 1
fi
