"""Where a vLLM decode step's time goes, with and without DASH-KV: per step, the whole step, the attention layers'
``forward`` and, inside it, DASH-KV's kernel. Run it with the vLLM environment's Python::

    .venv-vllm/bin/python scripts/vllm_step_times.py --batch 8 --context 2048

The embedded SmolLM2 with its shipped encoders and policy, fp32, one engine (single process, eager, prefix caching
on), ``batch`` random prompts of ``context`` tokens prefilled once; then, alternating as ``dashkv bench --engine
vllm`` does (DASH-KV detached and its layers' keys rewritten in vLLM's layout for "vLLM"), ``generate(1 + new)``
minus ``generate(1)`` divided by ``new``, and the same difference of the time spent in ``DashKVCPUImpl.forward`` (on
the layers that carry DASH-KV, and on the others) and in ``backend.kernel_decode``. A diagnostic, not the benchmark: single runs, on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from hf_dashkv.embedded import DEFAULT_MODEL
    from hf_dashkv.vllm import LLM, backend
    from hf_dashkv.vllm.bench import dashkv_switch

    spent = {"hashed": 0.0, "other": 0.0, "kernel": 0.0}

    def timed_into(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name(*a) if callable(name) else name] += time.perf_counter() - start
        return wrapper

    # the layers that carry DASH-KV (in either mode: their names), and the others
    hashed = set()
    # before the engine is built: its builders pick backend.kernel_decode by identity
    backend.DashKVCPUImpl.forward = timed_into(lambda impl, layer, *_: "hashed" if layer.layer_name in hashed
                                               else "other", backend.DashKVCPUImpl.forward)
    backend.kernel_decode = timed_into("kernel", backend.kernel_decode)
    g = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 40000, (args.context,), generator=g).tolist())
               for _ in range(args.batch)]
    llm = LLM(DEFAULT_MODEL, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, enable_prefix_caching=True,
              max_model_len=args.context + args.new_tokens + 32, max_num_seqs=args.batch, max_num_batched_tokens=8192,
              kv_cache_memory_bytes=int(args.batch * (args.context + 256) * 47_000 * 1.1))
    attach, _ = dashkv_switch(llm)
    context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    hashed.update(name for name, layer in context.items() if getattr(layer, "dashkv", None) is not None)

    def run(tokens: int) -> dict:
        for name in spent:
            spent[name] = 0.0
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return {"step": time.perf_counter() - start, **spent}

    start = time.perf_counter()
    run(2)
    print(f"{args.batch} x {args.context}: prefill {time.perf_counter() - start:.1f} s; ms per decode step:")
    print("| mode | step | attention, hashed layers | attention, other layers | DASH-KV kernel |\n|---|---:|---:|---:|---:|")
    for _ in range(args.repeats):
        for mode in ("vLLM", "DASH-KV"):
            attach(mode == "DASH-KV")
            one, more = run(1), run(1 + args.new_tokens)
            ms = {name: (more[name] - one[name]) * 1e3 / args.new_tokens for name in more}
            print(f"| {mode} | {ms['step']:.1f} | {ms['hashed']:.1f} | {ms['other']:.1f} | {ms['kernel']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
