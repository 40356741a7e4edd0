"""DASH-KV's CPU attention backend for vLLM 0.32: the stock ``CPU_ATTN`` backend, plus hash selection at decode on
the layers that carry DASH-KV state.

The plugin registers :class:`DashKVCPUBackend` in place of ``CPU_ATTN`` (the CPU platform always takes that entry,
whatever backend is asked for), so it serves every attention layer of every model in the process. It keeps the
stock name, builder and kernels; its impl differs only on layers that carry ``attn.dashkv``
(a :class:`~hf_dashkv.vllm.settings.LayerState`, attached by the DASH-KV model subclasses): installed but not asked
for, nothing changes.

On a DASH-KV layer:

- ``do_kv_cache_update``: the stock K/V write, then the keys (post-RoPE, as ``DashKVCache.store`` sees them) hashed
  once and their codes written at the same slots (``paged.write_codes``): prefill and decode tokens alike;
- ``forward``: the stock kernel for the batch, then each decode request (one query token) whose context the policy's
  budget does not cover is recomputed by the library's rule over the paged cache (``paged.paged_decode``: gather
  through the block table, then ``Plan.attend``), its output overwriting the stock one. Prefill tokens and covered
  requests keep the stock kernel's output, exactly as ``generate`` runs them dense.

First version, correctness before speed: the stock kernel also runs over the decode tokens it will not keep, and
the reference gathers each request's rows (a paged kernel comes next: ``docs/vllm-plan.md`` §4).
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ..selectors.base import Selector
from .paged import PagedLayer, cpu_kv_views, paged_decode, write_codes
from .settings import LayerState

# vLLM's CPU K/V layouts that paged.cpu_kv_views reads (AMX packs bf16 pairs differently)
READABLE_ISAS = ("vec", "vec16")


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
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        state: LayerState | None = getattr(layer, "dashkv", None)
        if state is None or attn_metadata is None:
            return output
        rows = selected_decodes(attn_metadata.query_start_loc, attn_metadata.seq_lens, state)
        if rows is None:
            return output
        if getattr(layer, "isa", "vec") not in READABLE_ISAS:
            raise NotImplementedError(
                f"DASH-KV reads vLLM's CPU K/V layout of the {READABLE_ISAS} ISAs; this engine uses {layer.isa!r} "
                "(bf16 on AMX). Use dtype='float32' (or float16)."
            )
        tokens = attn_metadata.query_start_loc[rows].long()
        q = query[tokens]  # [R, Hq, D]
        key_view, value_view = cpu_kv_views(kv_cache)
        out, _ = paged_decode(q, state.encoders.encode_query(q), PagedLayer(key_view, value_view, state.codes.kv_cache),
                              attn_metadata.block_table[rows], attn_metadata.seq_lens[rows], state.policy, self.scale,
                              state.layer_idx)
        output[tokens] = out.to(output.dtype)
        return output


def selected_decodes(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, state: LayerState) -> torch.Tensor | None:
    """The requests of a batch that decode with selection: one query token and a context the policy's budget does
    not cover (``Selector.covers``, as in ``generate``); ``None`` if there is none. ``query_start_loc [R + 1]``,
    ``seq_lens [R]`` (each request's context, its new tokens included)."""
    one_token = (query_start_loc[1:] - query_start_loc[:-1]) == 1
    rows = [r for r, (single, n) in enumerate(zip(one_token.tolist(), seq_lens.tolist()))
            if single and not Selector().covers(state.policy, n)]
    return torch.tensor(rows, dtype=torch.long) if rows else None


class DashKVCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with :class:`DashKVCPUImpl`; the name, builder, shapes and kernels stay the stock ones."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[DashKVCPUImpl]:
        return DashKVCPUImpl
