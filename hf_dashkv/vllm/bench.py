"""The serving benchmark's vLLM side: decode throughput of vLLM's own attention against DASH-KV's, interleaved on
one engine. ``dashkv bench --engine vllm`` runs it in the vLLM environment and writes the tables::

    python -m hf_dashkv.vllm.bench spec.json

``spec.json``: ``{"out": "result.json", "model": folder, "encoders": folder, "policy": {...} | null,
"prompts": [[token ids], ...], "batches": [1, 8], "contexts": [4096, 16384], "new_tokens": 32, "repeats": 3,
"kv_cache_bytes": int}``; ``prompts`` holds ``max(batches)`` distinct prompts of ``max(contexts)`` tokens.

Method. One engine with DASH-KV (single process, eager, fp32, vLLM's default CPU block size, 128; prefix caching
on) prefills every prompt once, at its longest context; the shorter contexts are prefixes of it, so each
measurement finds its prompt's full blocks cached and recomputes at most the last partial one. A measurement of
``batch`` requests at ``context`` runs ``generate(max_tokens=1 + new_tokens)`` on them and times each engine step
(:func:`step_seconds`): the last ``new_tokens`` steps are decode steps of the whole batch (the ones before them
recompute the prompts' last blocks and give the first token), so output tokens/s after prefill is ``batch *
new_tokens`` over their sum. "vLLM" is the same engine with every layer's DASH-KV state detached (``attn.dashkv =
None``) and those layers' keys rewritten in place in vLLM's layout (``paged.relayout_keys``; DASH-KV keeps them
row-major): the impl then runs the stock ``CPU_ATTN`` kernel on every layer with the stock metadata, as an engine
without DASH-KV does (the builder still makes its per-step split and the paged kernel's per-step arrays, well under
a millisecond a step, charged to "vLLM"); "DASH-KV" re-attaches it and rewrites the keys back. Modes alternate
within each repeat, so drift on a shared machine hits both. One engine serves both because a prefill of 8 x 16k
tokens takes tens of minutes on two cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # 16k contexts exceed SmolLM2's 8k: speed, not quality


def measure(spec: dict) -> dict:
    from tqdm import tqdm

    from . import LLM

    batches, contexts, new_tokens = spec["batches"], spec["contexts"], spec["new_tokens"]
    llm = LLM(spec["model"], encoders=spec["encoders"], policy=spec.get("policy"), dtype="float32",
              skip_tokenizer_init=True, enforce_eager=True, enable_prefix_caching=True,
              max_model_len=max(contexts) + new_tokens + 32, max_num_seqs=max(batches),
              max_num_batched_tokens=8192, kv_cache_memory_bytes=spec["kv_cache_bytes"])
    attach, hashed_layers = dashkv_switch(llm)

    prompts = spec["prompts"]
    start = time.perf_counter()
    for prompt in tqdm(prompts, desc="prefill (once)", file=sys.stderr):
        step_seconds(llm, [prompt], 2)  # and one decode step: the kernels compile (or load) before anything is timed
    prefill_seconds = time.perf_counter() - start
    rows = []
    shapes = [(batch, n) for n in contexts for batch in batches]
    for batch, n in tqdm(shapes, desc="shapes", file=sys.stderr):
        batch_prompts = [p[:n] for p in prompts[:batch]]
        rates = {"vllm": [], "dashkv": []}
        for _ in range(spec["repeats"]):
            for mode, values in rates.items():
                attach(mode == "dashkv")
                decode = step_seconds(llm, batch_prompts, 1 + new_tokens)[-new_tokens:]
                values.append(batch * new_tokens / sum(decode))
        attach(True)
        rows.append({"batch": batch, "context": n, **rates})
    return {"rows": rows, "prefill_seconds": prefill_seconds, "hashed_layers": hashed_layers,
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0"))}


def step_seconds(llm, prompts: list[list[int]], tokens: int, before_step: Callable[[], None] | None = None
                 ) -> list[float]:
    """Greedy ``generate`` of ``tokens`` tokens for each of ``prompts`` (token ids) on ``llm`` (single process), and the
    seconds of each of its engine steps, in order: at least ``tokens`` (the first step(s) prefill or recompute the
    prompts and give the first token, each later one a decode step of every request), checked. ``before_step`` is
    called before each step (a probe's per-step counters)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, seconds = llm.llm_engine, []

    def timed_step():
        if before_step is not None:
            before_step()
        start = time.perf_counter()
        try:
            return type(engine).step(engine)
        finally:
            seconds.append(time.perf_counter() - start)

    engine.step = timed_step  # the instance's step, for this call only
    try:
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                     SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
    finally:
        del engine.step
    if len(seconds) < tokens:
        raise RuntimeError(f"step_seconds: {tokens} tokens took {len(seconds)} engine steps; expected at least "
                           f"{tokens}.")
    return seconds


def dashkv_switch(llm) -> tuple[Callable[[bool], None], int]:
    """``(attach, count)``: ``attach(on)`` turns DASH-KV on or off on every one of the ``count`` DASH-KV layers of
    ``llm``'s engine (single process), in place: off, each layer's state is detached and its keys rewritten in vLLM's
    layout (``paged.relayout_keys``), so vLLM's own attention runs it; on, the reverse."""
    from .paged import relayout_keys

    context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    states = {name: layer.dashkv for name, layer in context.items() if getattr(layer, "dashkv", None) is not None}

    def attach(on: bool) -> None:
        for name, state in states.items():
            if (context[name].dashkv is not None) != on:
                relayout_keys(context[name].kv_cache, to_stock=not on)
            context[name].dashkv = state if on else None

    return attach, len(states)


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    result = measure(spec)
    with open(spec["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
