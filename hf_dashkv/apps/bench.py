"""`dashkv bench`: per-step decode attention latency, full attention vs DASH-KV, side by side in one process.

For each shape, dtype, context length N and budget, one decode step of one layer is timed, interleaved,
repeated, as:

- ``sdpa``: the best full attention here, SDPA over a cache that does not copy itself each step; the fastest
  of two layouts (query heads folded onto their KV head, or ``enable_gqa``) is kept per case;
- ``hf-default``: transformers' default path, ``DynamicLayer.update`` (a ``torch.cat`` of the whole cache)
  then ``sdpa_attention_forward``;
- ``dashkv``: the real DASH-KV path, ``DashKVLayer.update`` (stores and hashes the new key) then the
  ``dashkv`` attention function (query encoding, scoring and selection, exact attention over selected rows).

Ratios are ``sdpa / dashkv`` and ``hf-default / dashkv`` of the medians (> 1: DASH-KV is faster).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..attention import dashkv_attention_forward
from ..cache import DashKVLayer
from ..compat import with_cache
from ..config import DashKVConfig
from ..encoders import HashEncoders

SHAPES = {
    "smollm2": dict(num_heads=9, num_kv_heads=3, head_dim=64),
    "llama3-8b": dict(num_heads=32, num_kv_heads=8, head_dim=128),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchCase:
    shape: str
    dtype: str
    context: int
    budget: int | float


@dataclass
class BenchResult:
    shape: str
    dtype: str
    context: int
    budget: int | float
    exact_rows: int
    sdpa_ms: float
    hf_default_ms: float
    dashkv_ms: float
    sdpa_iqr_ms: float
    dashkv_iqr_ms: float

    @property
    def speedup(self) -> float:
        return self.sdpa_ms / self.dashkv_ms

    @property
    def speedup_vs_default(self) -> float:
        return self.hf_default_ms / self.dashkv_ms


class _Attention(torch.nn.Module):
    """Just the attributes transformers' attention functions read from an attention module."""

    def __init__(self, num_heads: int, num_kv_heads: int, layer_idx: int = 1):
        super().__init__()
        self.num_key_value_groups = num_heads // num_kv_heads
        self.is_causal = True
        self.layer_idx = layer_idx


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run_case(case: BenchCase, bits: int = 32, query_hidden: int = 0, repeats: int = 15, seed: int = 0,
             rerank: int = 1) -> BenchResult:
    """Time one decode step of one layer three ways (interleaved, ``repeats`` times) and return medians."""
    shape = SHAPES[case.shape]
    heads, kv_heads, head_dim = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    dtype, n = DTYPES[case.dtype], case.context
    model_config = LlamaConfig(
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        hidden_size=heads * head_dim,
    )
    config = DashKVConfig(bits=bits, budget=case.budget, query_hidden=query_hidden, dense_layers=(0,), rerank=rerank)
    encoders = HashEncoders.random(model_config, config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, n, head_dim, generator=g).to(dtype)
    values = torch.randn(1, kv_heads, n, head_dim, generator=g).to(dtype)
    module = _Attention(heads, kv_heads)
    scale = head_dim**-0.5

    dash = DashKVLayer(encoders[1], config)
    dash.store(keys, values)
    default = DynamicLayer()
    default.update(keys, values)

    def new_token():
        return tuple(torch.randn(1, h, 1, head_dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))

    def sdpa_step(q):
        folded = q.reshape(1, kv_heads, heads // kv_heads, head_dim)
        return torch.nn.functional.scaled_dot_product_attention(folded, keys, values, scale=scale)

    def sdpa_gqa_step(q):
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)

    def default_step(q, k, v):
        k_all, v_all = default.update(k, v)
        out = sdpa_attention_forward(module, q, k_all, v_all, None, scaling=scale)
        default.crop(-1)  # keep N fixed across repeats
        return out

    def dashkv_step(q, k, v):
        k_all, v_all = dash.update(k, v)
        out = dashkv_attention_forward(module, q, k_all, v_all, None, scaling=scale)
        dash.crop(-1)
        return out

    times = {"sdpa": [], "sdpa-gqa": [], "default": [], "dashkv": []}
    with torch.inference_mode():
        q, k, v = new_token()
        for step in (dashkv_step, default_step):  # warm-up: buffers grown, kernels compiled
            step(q, k, v)
        for _ in range(repeats):
            q, k, v = new_token()
            times["sdpa"].append(_timed(lambda: sdpa_step(q)))
            times["sdpa-gqa"].append(_timed(lambda: sdpa_gqa_step(q)))
            times["default"].append(_timed(lambda: default_step(q, k, v)))
            times["dashkv"].append(_timed(lambda: dashkv_step(q, k, v)))
    best_sdpa = min(("sdpa", "sdpa-gqa"), key=lambda name: statistics.median(times[name]))
    return BenchResult(
        **asdict(case),
        exact_rows=config.exact_tokens(n + 1),
        sdpa_ms=statistics.median(times[best_sdpa]),
        hf_default_ms=statistics.median(times["default"]),
        dashkv_ms=statistics.median(times["dashkv"]),
        sdpa_iqr_ms=_iqr(times[best_sdpa]),
        dashkv_iqr_ms=_iqr(times["dashkv"]),
    )


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def budget_label(budget: int | float) -> str:
    """``1/32`` for a fraction, the token count otherwise."""
    return f"1/{round(1 / budget)}" if isinstance(budget, float) else str(budget)


def markdown_table(results: list[BenchResult]) -> str:
    """Ratio table, one row per case."""
    lines = [
        "| shape | dtype | N | budget | exact rows | SDPA ms | HF default ms | DASH-KV ms | vs SDPA | vs HF default |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.shape} | {r.dtype} | {r.context // 1024}k | {budget_label(r.budget)} | {r.exact_rows} | "
            f"{r.sdpa_ms:.2f} ± {r.sdpa_iqr_ms:.2f} | {r.hf_default_ms:.2f} | {r.dashkv_ms:.2f} ± {r.dashkv_iqr_ms:.2f} | "
            f"**{r.speedup:.1f}x** | {r.speedup_vs_default:.1f}x |"
        )
    return "\n".join(lines)


def plot(results: list[BenchResult], path: Path) -> None:
    """Latency vs N, one panel per (shape, dtype); full attention and each DASH-KV budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.shape, r.dtype) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], panels):
        rows = [r for r in results if (r.shape, r.dtype) == (shape, dtype)]
        budgets = sorted({r.budget for r in rows}, key=str)
        first = [r for r in rows if r.budget == budgets[0]]
        ax.plot([r.context for r in first], [r.sdpa_ms for r in first], "k-o", label="full (best SDPA)")
        ax.plot([r.context for r in first], [r.hf_default_ms for r in first], "k--", label="HF default")
        for budget in budgets:
            sel = [r for r in rows if r.budget == budget]
            ax.plot([r.context for r in sel], [r.dashkv_ms for r in sel], "-o", label=f"DASH-KV {budget_label(budget)}")
        ax.set(xscale="log", yscale="log", xlabel="context N (tokens)", ylabel="ms per decode step (one layer)",
               title=f"{shape}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cases: list[BenchCase], out_dir: Path, bits: int = 32, query_hidden: int = 0, repeats: int = 15,
        rerank: int = 1) -> list[BenchResult]:
    """Run ``cases`` with a progress bar, write ``results.json``, ``results.md`` and ``latency.png`` to ``out_dir``."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for case in tqdm(cases, desc="dashkv bench", unit="case"):
        results.append(run_case(case, bits=bits, query_hidden=query_hidden, repeats=repeats, rerank=rerank))
    meta = dict(bits=bits, query_hidden=query_hidden, rerank=rerank, repeats=repeats, threads=torch.get_num_threads())
    (out_dir / "results.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1)
    )
    (out_dir / "results.md").write_text(markdown_table(results) + "\n")
    plot(results, out_dir / "latency.png")
    return results


@dataclass
class GenerateResult:
    context: int
    budget: int | float
    hf_default_tok_s: float
    full_tok_s: float
    dashkv_tok_s: float


def _filled_cache(cache, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], context: int):
    """``cache`` holding ``context`` tokens: the real K/V of a prefill, tiled along the sequence."""
    for layer_idx, (keys, values) in enumerate(layer_kv):
        reps = -(-context // keys.shape[2])
        tiled_k = keys.repeat(1, 1, reps, 1)[:, :, :context]
        tiled_v = values.repeat(1, 1, reps, 1)[:, :, :context]
        layer = cache.layers[layer_idx]
        # outside a forward pass: a hashed layer stores without leaving itself for an attention call
        (layer.store if isinstance(layer, DashKVLayer) else layer.update)(tiled_k, tiled_v)
    return cache


@torch.inference_mode()
def generate_speed(model, tokenizer, encoders: HashEncoders, config: DashKVConfig, contexts: list[int],
                   new_tokens: int = 16, prefill_tokens: int = 2048) -> list[GenerateResult]:
    """End-to-end greedy ``generate`` decode tokens/s at long contexts: transformers' default, full, DASH-KV.

    A real prefill of ``prefill_tokens`` gives every layer real K/V; the caches are then filled to each context
    length by tiling those K/V (a real prefill of 32k tokens takes many minutes on a CPU), and ``generate``
    decodes ``new_tokens`` after it. ``full`` is exact attention over DashKVCache's non-copying storage (all
    layers dense); ``hf-default`` is ``DynamicCache`` + SDPA.
    """
    from transformers import DynamicCache

    from ..cache import DashKVCache
    from .demo import passkey_prompt

    ids = tokenizer(passkey_prompt(tokenizer, prefill_tokens).text, return_tensors="pt").input_ids
    prefill = DynamicCache(config=model.config)
    model(ids, **with_cache(prefill))
    layer_kv = [(layer.keys, layer.values) for layer in prefill.layers]
    all_dense = replace(config, dense_layers=tuple(range(model.config.num_hidden_layers)))
    results = []
    for context in contexts:
        prompt = torch.cat([ids[:, :1].repeat(1, context), ids[:, -1:]], dim=1)  # N cached + the next token
        rates = {}
        for name, make in (
            ("hf_default", lambda: DynamicCache(config=model.config)),
            ("full", lambda: DashKVCache(model.config, config=all_dense)),
            ("dashkv", lambda: DashKVCache(model.config, encoders, config)),
        ):
            cache = _filled_cache(make(), layer_kv, context)
            rates[name] = _decode_rate(model, prompt, cache, new_tokens)
        results.append(GenerateResult(context, config.budget, rates["hf_default"], rates["full"], rates["dashkv"]))
    return results


def _decode_rate(model, prompt: torch.Tensor, cache, new_tokens: int) -> float:
    from transformers import LogitsProcessorList

    from .demo import StepClock

    clock = StepClock()
    model.generate(
        prompt, attention_mask=torch.ones_like(prompt), **with_cache(cache), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0,
    )
    return clock.tokens_per_second()


def generate_table(results: list[GenerateResult]) -> str:
    lines = [
        "| context | budget | HF default tok/s | full tok/s | DASH-KV tok/s | vs full | vs HF default |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.context // 1024}k | {budget_label(r.budget)} | {r.hf_default_tok_s:.1f} | {r.full_tok_s:.1f} | {r.dashkv_tok_s:.1f} | "
            f"**{r.dashkv_tok_s / r.full_tok_s:.2f}x** | {r.dashkv_tok_s / r.hf_default_tok_s:.2f}x |"
        )
    return "\n".join(lines)


def selection_speed(contexts: list[int], budget: float = 1 / 32, bits: int = 32, repeats: int = 15) -> str:
    """Choosing the nearest keys: the compiled kernel (popcount + counting) vs PyTorch (table popcount + topk).

    Llama-3-8B shape (8 KV heads, groups of 4 query heads, summed distances), ``budget`` of the context.
    Returns a markdown table of medians in ms.
    """
    from .. import kernels
    from ..codes import head_distances, nearest, pack_signs
    from ..selection import combine_group

    lines = ["| N | compiled kernel ms | PyTorch ms | ratio |", "|---:|---:|---:|---:|"]
    g = torch.Generator().manual_seed(0)
    for n in contexts:
        q = pack_signs(torch.randn(1, 8, 4, bits, generator=g))
        k = pack_signs(torch.randn(1, 8, n, bits, generator=g))
        k_budget = max(1, round(budget * n))
        everything = torch.ones(1, 8, n, dtype=torch.bool)
        runs = {
            "kernel": lambda: kernels.nearest_codes(q, k, torch.zeros(1, dtype=torch.long), n, k_budget, "sum"),
            "torch": lambda: nearest(combine_group(head_distances(q, k), "sum"), everything, k_budget),
        }
        times = {name: [] for name in runs}
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(_timed(fn))
        ms = {name: statistics.median(t) for name, t in times.items()}
        lines.append(f"| {n // 1024}k | {ms['kernel']:.2f} | {ms['torch']:.2f} | **{ms['torch'] / ms['kernel']:.0f}x** |")
    return "\n".join(lines)
