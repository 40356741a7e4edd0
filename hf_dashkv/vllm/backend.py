"""DASH-KV's CPU attention backend for vLLM 0.32: the stock ``CPU_ATTN`` backend, plus hash selection at decode on
the layers that carry DASH-KV state.

The plugin registers :class:`DashKVCPUBackend` in place of ``CPU_ATTN`` (the CPU platform always takes that entry,
whatever backend is asked for), so it serves every attention layer of every model in the process. It keeps the
stock name and kernels; its builder and impl differ only on layers that carry ``attn.dashkv``
(a :class:`~hf_dashkv.vllm.settings.LayerState`, attached by the DASH-KV model subclasses): installed but not asked
for, nothing changes.

On a DASH-KV layer:

- ``do_kv_cache_update``: the stock K/V write, then the keys (post-RoPE, as ``DashKVCache.store`` sees them) hashed
  once and their codes written at the same slots (``paged.write_codes``): prefill and decode tokens alike;
- the metadata builder splits, once per step, the requests that decode with selection (one query token, a context
  the policy's budget does not cover: ``Selector.covers``, as in ``generate``) from the others (prefills, prefill
  chunks, covered decodes), and builds the stock kernel's metadata for the others alone;
- ``forward``: the stock kernel on the others (exact, as ``generate`` runs prefill and covered steps), and the
  library's rule over the paged cache on the selected decodes: the compiled paged kernel
  (``kernels.paged_decode_attention``, reading each selected row in place by its slot), tested equal to the
  reference ``paged.paged_decode`` (gather through the block table, then ``Plan.attend``), which runs where the
  kernel cannot (fp16). Layers without DASH-KV state use the stock metadata of the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ..policy import DecodePolicy
from ..selectors.base import Selector
from .paged import PagedLayer, cpu_kv_views, paged_decode, write_codes
from .settings import LayerState

if TYPE_CHECKING:
    from ..kernels import PagedBatch

# vLLM's CPU K/V layouts that paged.cpu_kv_views reads (AMX packs bf16 pairs differently)
READABLE_ISAS = ("vec", "vec16")


@dataclass
class SelectedDecodes:
    """The requests of a step that decode with selection, gathered once per step for every DASH-KV layer: their
    query tokens ``[S]``, block-table rows ``[S, max_blocks]``, contexts ``[S]`` (the decode token included) and
    how every DASH-KV layer runs them (``decode``: :func:`kernel_decode` or :func:`reference_decode`, chosen once by
    the builder) and, for the kernel, what it takes of them (``steps``, a ``kernels.PagedBatch``: budgets per
    request, since a fractional budget differs, and the sink and recent rows)."""

    tokens: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    decode: Callable
    steps: PagedBatch | None


@dataclass
class DashKVCPUMetadata(CPUAttentionMetadata):
    """The stock metadata (what dense layers use) and, when some requests decode with selection, those
    (``selected``); ``rest_tokens`` (every other token, ``[T - S]``) and ``rest``, the stock metadata of the other
    requests alone (``None`` if there are none)."""

    selected: SelectedDecodes | None = None
    rest_tokens: torch.Tensor | None = None
    rest: CPUAttentionMetadata | None = None


class DashKVCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """The stock builder; once per step it also splits the requests that decode with selection (one query token,
    a context the policy's budget does not cover, as ``generate`` decides) from the rest (prefills, chunks of
    prefills, covered decodes), and builds the stock kernel's metadata for the rest alone."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()
        policies = {layer.dashkv.policy for layer in layers if getattr(layer, "dashkv", None) is not None}
        if len(policies) > 1:
            raise ValueError(f"DASH-KV layers of one model must share one decode policy, got {policies}.")
        self.policy: DecodePolicy | None = policies.pop() if policies else None
        # how selected decodes run, for every DASH-KV layer of this group: chosen once, here
        self.decode = choose_decode(self.isa, kv_cache_spec.dtype) if self.policy is not None else None

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> CPUAttentionMetadata:
        stock = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.policy is None or not stock.causal or stock.encoder_cache is not None:
            return stock
        md = DashKVCPUMetadata(**{f.name: getattr(stock, f.name) for f in fields(CPUAttentionMetadata)})
        starts, seq_lens = stock.query_start_loc, stock.seq_lens
        rows = selected_decodes(starts, seq_lens, self.policy)
        if not rows:
            return md
        chosen = torch.tensor(rows, dtype=torch.long)
        table, lengths, policy = stock.block_table[chosen], seq_lens[chosen], self.policy
        steps = None
        if self.decode is kernel_decode:
            budgets = torch.tensor([policy.budget_tokens(n) for n in lengths.tolist()], dtype=torch.long)
            steps = kernels().PagedBatch.paged(table, self.kv_cache_spec.block_size, lengths, policy.sink_tokens,
                                               policy.recent_tokens, budgets, policy.rerank)
        md.selected = SelectedDecodes(starts[chosen].long(), table, lengths, self.decode, steps)
        selected = set(rows)
        others = [r for r in range(seq_lens.shape[0]) if r not in selected]
        if others:
            md.rest_tokens, md.rest = self._rest(stock, torch.tensor(others, dtype=torch.long))
        return md

    def _rest(self, stock: CPUAttentionMetadata, others: torch.Tensor) -> tuple[torch.Tensor, CPUAttentionMetadata]:
        """The tokens of requests ``others`` and the stock metadata of those requests alone."""
        begin, end = stock.query_start_loc[others].long(), stock.query_start_loc[others + 1].long()
        tokens = torch.cat([torch.arange(a, b) for a, b in zip(begin.tolist(), end.tolist())])
        starts = torch.zeros(len(others) + 1, dtype=stock.query_start_loc.dtype)
        torch.cumsum(end - begin, 0, out=starts[1:])
        seq_lens = stock.seq_lens[others].contiguous()
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(others), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=starts, causal=True,
            sliding_window_size=self.window_size, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None, kv_cache_dtype=self.kv_cache_dtype,
        )
        rest = CPUAttentionMetadata(
            num_actual_tokens=tokens.shape[0], max_query_len=int((end - begin).max()), query_start_loc=starts,
            max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=stock.block_table[others].contiguous(),
            slot_mapping=stock.slot_mapping, scheduler_metadata=scheduler_metadata, causal=True,
        )
        return tokens, rest


class DashKVCPUImpl(CPUAttentionBackendImpl):
    """``CPU_ATTN``'s impl; on a layer with ``layer.dashkv``, codes are written with K/V and decode steps select."""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        state: LayerState | None = getattr(layer, "dashkv", None)
        if state is None:
            return
        tokens = min(key.shape[0], slot_mapping.shape[0])
        codes = state.encoders.encode_keys(key[:tokens].transpose(0, 1).unsqueeze(0))  # [1, Hkv, T, nbytes]
        write_codes(state.codes.kv_cache, slot_mapping[:tokens], codes[0].transpose(0, 1))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        state: LayerState | None = getattr(layer, "dashkv", None)
        md = attn_metadata
        if state is None or not isinstance(md, DashKVCPUMetadata) or md.selected is None:
            return super().forward(layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale)
        if md.rest is not None:  # prefills and covered decodes: the stock kernel on those requests alone
            rest = output.new_empty(md.rest_tokens.shape[0], *output.shape[1:])
            super().forward(layer, query[md.rest_tokens], None, None, kv_cache, md.rest, rest, output_scale,
                            output_block_scale)
            output[md.rest_tokens] = rest
        selected = md.selected
        q = query[selected.tokens]  # [S, Hq, D]
        paged = PagedLayer(*cpu_kv_views(kv_cache), state.codes.kv_cache)
        out = selected.decode(q, state.encoders.encode_query(q), paged, selected, state.policy, self.scale,
                              state.layer_idx)
        output[selected.tokens] = out.to(output.dtype)
        return output


def choose_decode(isa: str, dtype: torch.dtype) -> Callable:
    """How the DASH-KV layers of a KV-cache group run their selected decodes, chosen once (by the group's metadata
    builder, when the engine is built): the compiled paged kernel (``kernels.paged_decode_attention``) for fp32 and
    bf16, else the PyTorch reference (``paged.paged_decode``); the two are tested equal. Both read vLLM's CPU K/V
    layout of the ``vec``/``vec16`` ISAs only."""
    if isa not in READABLE_ISAS:
        raise NotImplementedError(
            f"DASH-KV reads vLLM's CPU K/V layout of the {READABLE_ISAS} ISAs; this engine uses {isa!r} "
            "(bf16 on AMX). Use dtype='float32' (or float16)."
        )
    if kernels().numba is None or dtype not in kernels().FLOAT_DTYPES:
        return reference_decode
    return kernel_decode


@functools.cache
def kernels():
    """``hf_dashkv.kernels``, imported at first use: vLLM's worker start must not find numba loaded
    (docs/vllm-plan.md §5). Once per process: the selected decodes of every layer call it."""
    from .. import kernels as compiled

    if compiled.numba is not None:
        # vLLM 0.32 reads vars() of every module attribute when a worker starts (triton_utils.dispatcher), and
        # llvmlite's ffi.lib answers `__dict__` with a C function: give it a dict, or a later engine in this
        # process fails to start
        from llvmlite.binding import ffi

        ffi.lib._fntab.setdefault("__dict__", {})
    return compiled


def kernel_decode(query, query_codes, paged: PagedLayer, selected: SelectedDecodes, policy: DecodePolicy,
                  scale: float, layer_idx: int) -> torch.Tensor:
    """The selected decodes through the compiled paged kernel: ``query [S, Hq, D]`` -> ``[S, Hq, D]``."""
    out, _, _ = kernels().paged_decode_attention(query, query_codes, paged.key, paged.value, paged.key_codes,
                                                 selected.steps, policy.group_reduce, scale)
    return out


def reference_decode(query, query_codes, paged: PagedLayer, selected: SelectedDecodes, policy: DecodePolicy,
                     scale: float, layer_idx: int) -> torch.Tensor:
    """The selected decodes through the PyTorch reference (``paged.paged_decode``): ``[S, Hq, D]``."""
    out, _ = paged_decode(query, query_codes, paged, selected.block_table, selected.seq_lens, policy, scale, layer_idx)
    return out


def selected_decodes(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, policy: DecodePolicy) -> list[int]:
    """The requests of a batch that decode with selection: one query token and a context the policy's budget does
    not cover (``Selector.covers``, as in ``generate``). ``query_start_loc [R + 1]``, ``seq_lens [R]`` (each
    request's context, its new tokens included)."""
    one_token = (query_start_loc[1:] - query_start_loc[:-1]) == 1
    return [r for r, (single, n) in enumerate(zip(one_token.tolist(), seq_lens.tolist()))
            if single and not Selector().covers(policy, n)]


class DashKVCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with DASH-KV's builder and impl; the name, shapes and kernels stay the stock ones."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[DashKVCPUImpl]:
        return DashKVCPUImpl

    @staticmethod
    def get_builder_cls() -> type[DashKVCPUMetadataBuilder]:
        return DashKVCPUMetadataBuilder
