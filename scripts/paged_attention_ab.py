"""One attention layer at decode over vLLM's paged CPU cache: vLLM's own kernel against DASH-KV's paged kernel,
interleaved in one process. Run it with the vLLM environment's Python (it calls vLLM's CPU attention op)::

    .venv-vllm/bin/python scripts/paged_attention_ab.py --requests 8 --context 16384 --block-size 128

SmolLM2's attention shape (3 KV heads, 9 query heads, head_dim 64, fp32, 128-bit codes), random K/V, random codes
(so the selected rows are scattered as widely as they can be) and shuffled block tables. Rows:

- ``vLLM CPU_ATTN``: ``ops.cpu_attention_with_kv_cache`` on every request, as a decode step runs it;
- ``DASH-KV, rerank 1`` / ``rerank 2``: ``kernels.paged_decode_attention`` (on OpenMP threads, as in the engine)
  with the shipped policy's windows and a 1/32 budget over a DASH-KV layer's cache: the same K/V with each block's
  keys row-major (``paged.dashkv_kv_views``), read in place;
- ``codes only``: budget 0, the sinks and recent window (the Hamming pass over every code and the fixed rows).

Prints the median ms of each and its speed-up over vLLM's kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from vllm import _custom_ops as ops

from hf_dashkv import kernels
from hf_dashkv.vllm.paged import dashkv_kv_views, relayout_keys

KV_HEADS, GROUP, DIM, CODE_BYTES = 3, 3, 64, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--block-size", type=int, default=128, help="vLLM's CPU default")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.share_torch_threads()  # as in vLLM's engine (hf_dashkv.vllm.backend.kernels)
    r, n, bs = args.requests, args.context, args.block_size
    blocks = r * n // bs
    g = torch.Generator().manual_seed(0)
    kv_cache = torch.randn(blocks + 1, KV_HEADS, bs, 2 * DIM, generator=g)  # block 0: vLLM's null block
    codes = torch.randint(0, 256, (blocks + 1, KV_HEADS, bs, CODE_BYTES), dtype=torch.uint8, generator=g)
    table = (torch.randperm(blocks, generator=g) + 1).view(r, n // bs).to(torch.int32)
    seq_lens = torch.full((r,), n, dtype=torch.int32)
    query = torch.randn(r, KV_HEADS * GROUP, DIM, generator=g)
    query_codes = torch.randint(0, 256, (r, KV_HEADS, GROUP, CODE_BYTES), dtype=torch.uint8, generator=g)
    starts = torch.arange(r + 1, dtype=torch.int32)
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=r, num_heads=KV_HEADS * GROUP, num_kv_heads=KV_HEADS, head_dim=DIM, seq_lens=seq_lens,
        dtype=torch.float32, query_start_loc=starts, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=False, dynamic_causal=None, kv_cache_dtype="auto")
    key_cache, value_cache = kv_cache.view(blocks + 1, KV_HEADS, 2 * bs, DIM).chunk(2, dim=2)  # as CPU_ATTN does
    out = torch.empty_like(query)
    layer_cache = kv_cache.clone()
    relayout_keys(layer_cache, to_stock=False)  # a DASH-KV layer's cache: the same K/V, keys row-major
    key, value = dashkv_kv_views(layer_cache)
    budgets = torch.full((r,), n // 32)

    def stock():
        ops.cpu_attention_with_kv_cache(query, key_cache, value_cache, out, starts, seq_lens, DIM ** -0.5, True, None,
                                        -1, table, 0.0, scheduler, None, None, 1.0, 1.0, "auto")

    def dashkv(budget, rerank):
        # the per-step part (block tables, budgets, fixed rows) is built once per step for all layers: not timed
        steps = kernels.PagedBatch.paged(table, bs, seq_lens, 4, 64, budget, rerank)
        return lambda: kernels.paged_decode_attention(query, query_codes, key, value, codes, steps, "sum", DIM ** -0.5)

    cases = {"vLLM CPU_ATTN": stock, "DASH-KV, rerank 1": dashkv(budgets, 1), "DASH-KV, rerank 2": dashkv(budgets, 2),
             "codes only (budget 0)": dashkv(torch.zeros_like(budgets), 1)}
    for run in cases.values():  # compile, and warm the caches' pages
        run()
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["vLLM CPU_ATTN"])
    print(f"{r} requests x {n} tokens, block size {bs}, {args.threads} threads; one layer, one decode step\n")
    print("| attention | ms (median) | vs vLLM |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.2f} | {base / statistics.median(values):.2f}x |")


if __name__ == "__main__":
    main()
