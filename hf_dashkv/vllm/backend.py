"""DASH-KV's CPU attention backend for vLLM 0.32: the stock ``CPU_ATTN`` backend, plus hash selection at decode on
the layers that carry DASH-KV state.

The plugin registers :class:`DashKVCPUBackend` in place of ``CPU_ATTN`` (the CPU platform always takes that entry,
whatever backend is asked for), so it serves every attention layer of every model in the process. It keeps the
stock name and kernels; its builder and impl differ only on layers that carry ``attn.dashkv``
(a :class:`~hf_dashkv.vllm.settings.LayerState`, attached by the DASH-KV model subclasses): installed but not asked
for, nothing changes.

On a DASH-KV layer:

- ``do_kv_cache_update``: K/V written at their slots with the keys row-major (``paged.dashkv_kv_views``: a selected
  key is one contiguous row, not one value per cache line), and the keys (post-RoPE, as ``DashKVCache.store`` sees
  them) hashed once and their codes written at the same slots, prefill and decode tokens alike: the layer's
  ``LayerState.store`` (:func:`choose_store`: one compiled call, ``kernels.store_paged``, or the PyTorch reference
  ``paged.store_at_slots``);
- the metadata builder splits, once per step, the query tokens that decode with selection from the others. A token
  decodes with selection where ``generate`` would: at a position past its request's prompt (a generated token: a
  decode step, or one that vLLM recomputes after a preemption, replayed as the decode step it was) whose context the
  policy's budget does not cover (``paged.first_selected``). The others (prompt tokens, covered steps) get the stock
  kernel's metadata, built for them alone over a copy of the blocks they read. Prompt lengths come from the
  engine's input batch (``DashKVCPUMetadataBuilder.prompt_lengths``, wired by
  :class:`~hf_dashkv.vllm.worker.DashKVCPUWorker`);
- ``forward``: the stock kernel on the others, over those blocks copied into its layout (``paged.stock_layout_copy``:
  exact, as ``generate`` runs prefill and covered steps; the copy is linear in their context, their attention is
  not), and the library's rule over the paged cache on the selected decodes: the compiled paged kernel
  (``kernels.paged_decode_attention``, reading each selected row in place by its slot), tested equal to the
  reference ``paged.paged_decode`` (gather through the block table, then ``Plan.attend``), which runs where the
  kernel cannot (fp16).

Layers without DASH-KV state (the policy's dense layers, other models) keep vLLM's layout and the stock metadata of
the whole batch.
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
from .paged import PagedLayer, dashkv_kv_views, first_selected, paged_decode, stock_layout_copy, store_at_slots
from .settings import WORKER_CLS, LayerState

if TYPE_CHECKING:
    from ..kernels import PagedBatch

# vLLM's CPU K/V layouts that paged.stock_layout_copy writes for the stock kernel (AMX packs bf16 pairs differently)
READABLE_ISAS = ("vec", "vec16")


@dataclass
class SelectedDecodes:
    """The query tokens of a step that decode with selection, gathered once per step for every DASH-KV layer, ``S``
    rows, one per token: its index in the batch ``tokens [S]``, its request's block-table row ``block_table [S,
    max_blocks]``, its context ``seq_lens [S]`` (its own position included: a recomputed position sees only its
    prefix, as when it was decoded), how every DASH-KV layer runs them (``decode``: :func:`kernel_decode` or
    :func:`reference_decode`, chosen once by the builder) and, for the kernel, what it takes of them (``steps``, a
    ``kernels.PagedBatch``: budgets per row, since a fractional budget differs, and the sink and recent rows)."""

    tokens: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    decode: Callable
    steps: PagedBatch | None


@dataclass
class DashKVCPUMetadata(CPUAttentionMetadata):
    """The stock metadata (what layers without DASH-KV use) and, for DASH-KV layers, the tokens that decode with
    selection (``selected``, ``None`` if none) and every other token (``rest_tokens``, ``[T - S]``, ``None`` if
    none): the blocks they read (``rest_blocks [nb]``) and ``rest``, the stock metadata of those tokens alone, each
    request cut to its tokens before its first selected one, over a copy of those blocks in vLLM's layout."""

    selected: SelectedDecodes | None = None
    rest_tokens: torch.Tensor | None = None
    rest_blocks: torch.Tensor | None = None
    rest: CPUAttentionMetadata | None = None


class DashKVCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """The stock builder; once per step it also splits the query tokens that decode with selection (module
    docstring) from the rest, and builds the stock kernel's metadata for the rest alone.

    ``prompt_lengths``: a callable returning the prompt length of every row of the engine's batch (``int [>= R]``,
    rows in the batch's order), set once by :class:`~hf_dashkv.vllm.worker.DashKVCPUWorker` after the builders
    exist; a row of length 0 holds no request (a warm-up batch) and is prefilled densely."""

    prompt_lengths: Callable[[], torch.Tensor] | None = None

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
        if self.prompt_lengths is None:
            raise RuntimeError(
                "DASH-KV layers need the prompt length of each request, which vLLM's own worker does not give "
                f"attention backends: start the engine with worker_cls={WORKER_CLS!r} (hf_dashkv.vllm.LLM and "
                "`dashkv serve` do)."
            )
        md = DashKVCPUMetadata(**{f.name: getattr(stock, f.name) for f in fields(CPUAttentionMetadata)})
        starts, seq_lens = stock.query_start_loc.long(), stock.seq_lens.long()
        prompts = self.prompt_lengths()[: seq_lens.shape[0]].long()
        split = first_selected(starts, seq_lens, prompts, self.policy)
        computed = seq_lens - (starts[1:] - starts[:-1])
        if not bool((split == seq_lens).all()):
            md.selected = self._selected(stock, split, computed)
        dense = (split > computed).nonzero().flatten()
        if dense.numel():
            md.rest_tokens, md.rest_blocks, md.rest = self._rest(stock, dense, split[dense] - computed[dense],
                                                                 split[dense])
        return md

    def _selected(self, stock: CPUAttentionMetadata, split: torch.Tensor, computed: torch.Tensor) -> SelectedDecodes:
        """The rows of the query tokens at or past each request's ``split`` (``paged.first_selected``), ``computed``
        its tokens before this step."""
        seq_lens, policy = stock.seq_lens.tolist(), self.policy
        chosen = [(r, p) for r, (a, b) in enumerate(zip(split.tolist(), seq_lens)) for p in range(a, b)]
        rows = torch.tensor([r for r, _ in chosen], dtype=torch.long)
        positions = torch.tensor([p for _, p in chosen], dtype=torch.long)
        table, lengths = stock.block_table[rows], positions + 1
        steps = None
        if self.decode is kernel_decode:
            budgets = torch.tensor([policy.budget_tokens(n) for n in lengths.tolist()], dtype=torch.long)
            steps = kernels().PagedBatch.paged(table, self.kv_cache_spec.block_size, lengths, policy.sink_tokens,
                                               policy.recent_tokens, budgets, policy.rerank)
        tokens = stock.query_start_loc[rows].long() + positions - computed[rows]
        return SelectedDecodes(tokens, table, lengths, self.decode, steps)

    def _rest(self, stock: CPUAttentionMetadata, requests: torch.Tensor, counts: torch.Tensor,
              seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, CPUAttentionMetadata]:
        """The first ``counts [K]`` query tokens of each of ``requests [K]``, the blocks they read (``[nb]``, each
        once) and the stock metadata of those tokens alone over a copy of those blocks (block ``i`` of the copy is
        block ``blocks[i]``), each request's context cut to ``seq_lens [K]`` (its last kept token's)."""
        begin = stock.query_start_loc[requests].long()
        tokens = torch.cat([torch.arange(a, a + k) for a, k in zip(begin.tolist(), counts.tolist())])
        starts = torch.zeros(requests.shape[0] + 1, dtype=stock.query_start_loc.dtype)
        torch.cumsum(counts, 0, out=starts[1:])
        widths = -(-seq_lens // self.kv_cache_spec.block_size)  # blocks each request reads
        table = stock.block_table[requests][:, : int(widths.max())]
        read = torch.arange(table.shape[1]) < widths[:, None]
        blocks, inverse = torch.unique(table[read].long(), return_inverse=True)
        copy_table = torch.zeros_like(table)
        copy_table[read] = inverse.to(table.dtype)
        seq_lens = seq_lens.to(stock.seq_lens.dtype).contiguous()
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=requests.shape[0], num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype, query_start_loc=starts, causal=True,
            sliding_window_size=self.window_size, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None, kv_cache_dtype=self.kv_cache_dtype,
        )
        rest = CPUAttentionMetadata(
            num_actual_tokens=tokens.shape[0], max_query_len=int(counts.max()), query_start_loc=starts,
            max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=copy_table,
            slot_mapping=stock.slot_mapping, scheduler_metadata=scheduler_metadata, causal=True,
        )
        return tokens, blocks, rest


class DashKVCPUImpl(CPUAttentionBackendImpl):
    """``CPU_ATTN``'s impl; a layer with ``layer.dashkv`` keeps its keys row-major (``paged.dashkv_kv_views``) and
    their codes beside them, and its decode steps select."""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        state: LayerState | None = getattr(layer, "dashkv", None)
        if state is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        tokens = min(key.shape[0], slot_mapping.shape[0])
        key, value = key[:tokens], value[:tokens]  # [T, Hkv, D]
        projections = state.encoders.key_projections(key.transpose(0, 1))  # [Hkv, T, bits]: their signs are the codes
        state.store(slot_mapping[:tokens], key, value, projections, *dashkv_kv_views(kv_cache), state.codes.kv_cache)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        state: LayerState | None = getattr(layer, "dashkv", None)
        md: DashKVCPUMetadata | None = attn_metadata
        if state is None or md is None:  # a layer without DASH-KV, or a warm-up pass (no metadata: nothing to read)
            return super().forward(layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale)
        key_view, value_view = dashkv_kv_views(kv_cache)
        if md.rest is not None:  # prompt tokens and covered decodes: the stock kernel, on its layout of their blocks
            rest = output.new_empty(md.rest_tokens.shape[0], *output.shape[1:])
            copy = stock_layout_copy(key_view, value_view, md.rest_blocks)
            super().forward(layer, query[md.rest_tokens], None, None, copy, md.rest, rest, output_scale,
                            output_block_scale)
            output[md.rest_tokens] = rest
        selected = md.selected
        if selected is not None:
            q = query[selected.tokens]  # [S, Hq, D]
            paged = PagedLayer(key_view, value_view, state.codes.kv_cache)
            out = selected.decode(q, state.encoders.encode_query(q), paged, selected, state.policy, self.scale,
                                  state.layer_idx)
            output[selected.tokens] = out.to(output.dtype)
        return output


def choose_decode(isa: str, dtype: torch.dtype) -> Callable:
    """How the DASH-KV layers of a KV-cache group run their selected decodes, chosen once (by the group's metadata
    builder, when the engine is built): the compiled paged kernel (``kernels.paged_decode_attention``) for fp32 and
    bf16, else the PyTorch reference (``paged.paged_decode``); the two are tested equal. The stock kernel reads copies
    in vLLM's CPU K/V layout of the ``vec``/``vec16`` ISAs (``paged.stock_layout_copy``): those ISAs only."""
    if isa not in READABLE_ISAS:
        raise NotImplementedError(
            f"DASH-KV hands vLLM's kernel K/V in its CPU layout of the {READABLE_ISAS} ISAs; this engine uses {isa!r} "
            "(bf16 on AMX). Use dtype='float32' (or float16)."
        )
    if kernels().numba is None or dtype not in kernels().FLOAT_DTYPES:
        return reference_decode
    return kernel_decode


def choose_store(dtype: torch.dtype) -> Callable:
    """How a DASH-KV layer with a ``dtype`` K/V cache writes new tokens' K/V and codes, chosen once per layer (by
    ``model.attach``): one compiled call (``kernels.store_paged``) for fp32 and bf16, else the PyTorch reference
    ``paged.store_at_slots``; the two are tested equal."""
    if kernels().numba is None or dtype not in kernels().FLOAT_DTYPES:
        return store_at_slots
    return kernels().store_paged


@functools.cache
def kernels():
    """``hf_dashkv.kernels``, imported at first use: vLLM's worker start must not find numba loaded
    (docs/vllm-plan.md §5), and its kernels run on torch's OpenMP threads (``kernels.share_torch_threads``). Once per
    process: the selected decodes of every layer call it."""
    from .. import kernels as compiled

    if compiled.numba is not None:
        # vLLM 0.32 reads vars() of every module attribute when a worker starts (triton_utils.dispatcher), and
        # llvmlite's ffi.lib answers `__dict__` with a C function: give it a dict, or a later engine in this
        # process fails to start
        from llvmlite.binding import ffi

        ffi.lib._fntab.setdefault("__dict__", {})
        # every other op of a vLLM step runs on torch's OpenMP threads; the engine spawns its workers (no fork)
        compiled.share_torch_threads()
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
