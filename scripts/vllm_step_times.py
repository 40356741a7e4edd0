"""Where a vLLM decode step's time goes, with and without DASH-KV: per step, the whole step, the attention layers'
``forward`` and, inside it, DASH-KV's kernel. Run it with the vLLM environment's Python::

    .venv-vllm/bin/python scripts/vllm_step_times.py --batch 8 --context 2048

The embedded SmolLM2 with its shipped encoders and policy, fp32, one engine (single process, eager, prefix caching
on), ``batch`` random prompts of ``context`` tokens prefilled once; then, alternating as ``dashkv bench --engine
vllm`` does (DASH-KV detached and its layers' keys rewritten in vLLM's layout for "vLLM"), ``generate(1 + new)``
timed step by step (``bench.step_seconds``): over its last ``new`` steps (decode steps of the whole batch), the
median of each step's time, of the time spent in ``DashKVCPUImpl.forward`` (on the layers that carry DASH-KV, and on
the others) and of that in ``backend.kernel_decode`` (with ``--per-step``, each step's time too). A diagnostic, not
the benchmark: single runs, on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
SPENT = ("hashed", "other", "kernel", "update", "update_other", "build")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-step", action="store_true", help="also print each decode step's ms, in order")
    args = parser.parse_args()

    import torch

    from hf_dashkv.embedded import DEFAULT_MODEL
    from hf_dashkv.vllm import LLM, backend
    from hf_dashkv.vllm.bench import dashkv_switch, step_seconds

    spent: list[dict[str, float]] = []  # per engine step

    def timed_into(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[-1][name(*a) if callable(name) else name] += time.perf_counter() - start
        return wrapper

    # the layers that carry DASH-KV (in either mode: their names), and the others
    hashed = set()
    # before the engine is built: its builders pick backend.kernel_decode by identity
    backend.DashKVCPUImpl.forward = timed_into(lambda impl, layer, *_: "hashed" if layer.layer_name in hashed
                                               else "other", backend.DashKVCPUImpl.forward)
    backend.kernel_decode = timed_into("kernel", backend.kernel_decode)
    backend.DashKVCPUImpl.do_kv_cache_update = timed_into(
        lambda impl, layer, *_: "update" if layer.layer_name in hashed else "update_other",
        backend.DashKVCPUImpl.do_kv_cache_update)
    backend.DashKVCPUMetadataBuilder.build = timed_into("build", backend.DashKVCPUMetadataBuilder.build)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.context,), generator=g).tolist() for _ in range(args.batch)]
    llm = LLM(DEFAULT_MODEL, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, enable_prefix_caching=True,
              max_model_len=args.context + args.new_tokens + 32, max_num_seqs=args.batch, max_num_batched_tokens=8192,
              kv_cache_memory_bytes=int(args.batch * (args.context + 256) * 47_000 * 1.1))
    attach, _ = dashkv_switch(llm)
    context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    hashed.update(name for name, layer in context.items() if getattr(layer, "dashkv", None) is not None)

    def run(tokens: int) -> tuple[dict[str, float], list[float]]:
        """Median ms of the last ``tokens - 1`` (decode) steps, the whole step's and each counter's, and each of
        those steps' ms."""
        seconds = step_seconds(llm, prompts, tokens, lambda: spent.append(dict.fromkeys(SPENT, 0.0)))
        decode = [{"step": t, **c} for t, c in zip(seconds, spent)][-(tokens - 1):]
        spent.clear()
        medians = {name: statistics.median(step[name] for step in decode) * 1e3 for name in ("step", *SPENT)}
        return medians, [step["step"] * 1e3 for step in decode]

    start = time.perf_counter()
    run(2)
    print(f"{args.batch} x {args.context}: prefill {time.perf_counter() - start:.1f} s; ms per decode step (median):")
    print("| mode | step | attention, hashed layers | attention, other layers | DASH-KV kernel | K/V (and codes) write, "
          "hashed layers | K/V write, other layers | metadata build |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    steps = []
    for _ in range(args.repeats):
        for mode in ("vLLM", "DASH-KV"):
            attach(mode == "DASH-KV")
            ms, each = run(1 + args.new_tokens)
            steps.append((mode, each))
            print(f"| {mode} | {' | '.join(f'{ms[name]:.1f}' for name in ('step', *SPENT))} |", flush=True)
    if args.per_step:
        print("\nms of each decode step, in order (sum in brackets):")
        for mode, each in steps:
            print(f"{mode}: [{sum(each):.0f}] {', '.join(f'{t:.0f}' for t in each)}")


if __name__ == "__main__":
    main()
