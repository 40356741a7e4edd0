"""The paged reference: DASH-KV decode over a serving engine's paged cache, by the library's one selection rule.

vLLM keeps each request's K/V in fixed-size blocks that a block table lists in order; several requests can share
prefix blocks, and the last block of a request is usually partial. This module defines which tokens of a serving
step decode with selection (:func:`first_selected`: the generated ones whose context the budget does not cover, as
in ``generate``) and what such a step of one hashed layer returns over that cache: for each request, the output and
the :class:`~hf_dashkv.selection.Selection` that :class:`~hf_dashkv.plans.CodePlan` (or
:class:`~hf_dashkv.plans.RerankPlan`) gives on the request's contiguous cache. It gathers each request's rows
through its block table and runs ``Plan.attend`` on them, so it is equal to
the library by construction; a paged kernel reads the blocks in place and is tested equal to this.

Layouts (the logical layout of vLLM 0.32's CPU attention, ``docs/vllm-plan.md``):

- keys, values: ``[num_blocks, Hkv, block_size, D]`` each, indexed logically (``key[block, head, offset]`` is one
  token's key); any strides. vLLM's CPU cache holds both in one ``[num_blocks, Hkv, block_size, 2 * D]`` tensor
  with each block's keys transposed in memory; :func:`cpu_kv_views` gives the logical views of it. On the layers
  that DASH-KV serves, the same tensor holds the keys row-major instead (:func:`dashkv_kv_views`): a selected key is
  then one contiguous row, where vLLM's layout spreads it over ``D`` cache lines, one per dimension, which a
  selective read pays in full (``docs/speed.md``); vLLM's own kernel reads a copy in its layout
  (:func:`stock_layout_copy`);
- key codes: ``[num_blocks, Hkv, block_size, nbytes]`` uint8, paged with the same block ids as K/V (a side cache in
  the same KV-cache group), bits packed as in :mod:`hf_dashkv.codes`;
- ``slot_mapping`` ``[T]``: token ``t`` lives at block ``slot // block_size``, offset ``slot % block_size``; negative
  slots are padding and are not written;
- ``block_table`` ``[R, max_blocks]`` int, ``seq_lens`` ``[R]`` int: request ``r``'s position ``p`` is at block
  ``block_table[r, p // block_size]``, offset ``p % block_size``; its context is ``seq_lens[r]`` tokens, the
  decode token's own key included (vLLM writes K/V and codes before attention reads them).

Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codes import pack_signs
from ..exact import attend_rows
from ..policy import DecodePolicy
from ..selection import Selection
from ..selectors.base import Selector
from ..selectors.hash import hash_plan
from ..step import DecodeStep


@dataclass(frozen=True)
class PagedLayer:
    """One layer's paged cache: ``key``, ``value`` ``[num_blocks, Hkv, block_size, D]`` and ``key_codes``
    ``[num_blocks, Hkv, block_size, nbytes]`` uint8, all addressed by the same block ids."""

    key: torch.Tensor
    value: torch.Tensor
    key_codes: torch.Tensor

    def __post_init__(self) -> None:
        if self.key.shape != self.value.shape:
            raise ValueError(f"PagedLayer: keys {tuple(self.key.shape)} and values {tuple(self.value.shape)} differ.")
        if self.key_codes.shape[:3] != self.key.shape[:3] or self.key_codes.dtype != torch.uint8:
            raise ValueError(
                f"PagedLayer: key codes must be uint8 [num_blocks, Hkv, block_size, nbytes] paged like the keys "
                f"{tuple(self.key.shape[:3])}, got {self.key_codes.dtype} {tuple(self.key_codes.shape)}."
            )

    @property
    def block_size(self) -> int:
        return self.key.shape[2]

    def request_step(self, query: torch.Tensor, block_row: torch.Tensor, n: int, scale: float,
                     layer_idx: int) -> DecodeStep:
        """The :class:`DecodeStep` of one request, its rows gathered through its block table (batch of one).

        Args:
            query: ``[Hq, D]``, the request's decode token; block_row: ``[max_blocks]``, its block table row;
            n: its context length (``seq_lens[r]``); scale: the attention scaling; layer_idx: the model layer.
        """
        blocks = block_row[: -(-n // self.block_size)].long()
        key, value, codes = (gather_blocks(t, blocks, n) for t in (self.key, self.value, self.key_codes))
        return DecodeStep(query[None, :, None], key, value, codes, None, scale, layer_idx)


def gather_blocks(paged: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """A request's first ``n`` rows, contiguous: ``paged [num_blocks, H, block_size, X]`` through ``blocks [nb]``
    -> ``[1, H, n, X]``."""
    rows = paged.index_select(0, blocks)  # [nb, H, block_size, X]
    return rows.transpose(0, 1).flatten(1, 2)[:, :n].unsqueeze(0)


def cpu_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical ``(key, value)`` views ``[num_blocks, Hkv, block_size, D]`` of one layer's cache in vLLM 0.32's CPU
    layout (``CPU_ATTN``, "vec" ISA, fp32), without a copy.

    That cache is ``[num_blocks, Hkv, block_size, 2 * D]``; the backend reads each ``[block, head]`` as
    ``2 * block_size * D`` values: the block's keys transposed (``[D, block_size]``), then its values
    (``[block_size, D]``). (The AMX ISA interleaves bf16 pairs instead: not this layout.)
    """
    num_blocks, kv_heads, block_size, twice = kv_cache.shape
    dim = twice // 2
    halves = kv_cache.view(num_blocks, kv_heads, 2, block_size * dim)
    key = halves[:, :, 0].unflatten(-1, (dim, block_size)).transpose(-1, -2)
    value = halves[:, :, 1].unflatten(-1, (block_size, dim))
    return key, value


def dashkv_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical ``(key, value)`` views ``[num_blocks, Hkv, block_size, D]`` of a DASH-KV layer's cache: vLLM's CPU
    tensor ``[num_blocks, Hkv, block_size, 2 * D]``, each ``[block, head]`` holding the block's keys row-major
    (``[block_size, D]``), then its values as vLLM stores them. Both views are contiguous rows; no copy."""
    num_blocks, kv_heads, block_size, twice = kv_cache.shape
    halves = kv_cache.view(num_blocks, kv_heads, 2, block_size, twice // 2)
    return halves[:, :, 0], halves[:, :, 1]


def stock_layout_copy(key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks ``blocks [nb]`` of logical ``key``/``value`` views, copied into a new ``[nb, Hkv, block_size, 2 * D]``
    cache in vLLM's CPU layout (keys transposed per block), the copy's block ``i`` being block ``blocks[i]``: what
    vLLM's kernel reads of a DASH-KV layer."""
    num_blocks = blocks.shape[0]
    kv_heads, block_size, dim = key.shape[1:]
    copy = key.new_empty(num_blocks, kv_heads, block_size, 2 * dim)
    copy_key, copy_value = cpu_kv_views(copy)
    copy_key.copy_(key.index_select(0, blocks))
    copy_value.copy_(value.index_select(0, blocks))
    return copy


def relayout_keys(kv_cache: torch.Tensor, to_stock: bool, blocks_at_once: int = 1024) -> None:
    """Rewrite a layer's keys in place from DASH-KV's row-major layout to vLLM's (keys transposed per block), or
    back: what a layer switched between DASH-KV and vLLM's own attention needs (the serving benchmark's baseline).
    Values are laid out alike in both."""
    source, target = (dashkv_kv_views, cpu_kv_views) if to_stock else (cpu_kv_views, dashkv_kv_views)
    for start in range(0, kv_cache.shape[0], blocks_at_once):
        part = kv_cache[start:start + blocks_at_once]
        keys = source(part)[0].clone()
        target(part)[0].copy_(keys)


def first_selected(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, prompt_lens: torch.Tensor,
                   policy: DecodePolicy) -> torch.Tensor:
    """Each request's first position that decodes with selection (``seq_lens[r]`` if none): the first of its query
    positions at or past its prompt whose context the budget does not cover (``Selector.covers``, as in
    ``generate``); every later query position decodes with selection too (covering is monotone in the context).
    ``query_start_loc [R + 1]``, ``seq_lens [R]`` (each request's context, its query tokens included),
    ``prompt_lens [R]`` (0: no request, prefilled densely)."""
    computed = seq_lens - (query_start_loc[1:] - query_start_loc[:-1])
    split = []
    for first, n, prompt in zip(computed.tolist(), seq_lens.tolist(), prompt_lens.tolist()):
        p = min(max(first, prompt), n) if prompt > 0 else n
        while p < n and Selector().covers(policy, p + 1):
            p += 1
        split.append(p)
    return torch.tensor(split, dtype=torch.long)


def paged_decode(
    query: torch.Tensor,
    query_codes: torch.Tensor,
    layer: PagedLayer,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    policy: DecodePolicy,
    scale: float,
    layer_idx: int = 0,
) -> tuple[torch.Tensor, list[Selection]]:
    """One decode token for each of ``R`` requests over a paged cache: the library's rule applied per request.

    Args:
        query: ``[R, Hq, D]``, post-RoPE, one decode token per request; query_codes: ``[R, Hkv, G, nbytes]``
            (``LayerEncoders.encode_query(query)``); layer: the paged K/V and key codes; block_table:
            ``[R, max_blocks]``; seq_lens: ``[R]``, each request's context (its decode token included); policy: the
            decode policy; scale: the attention scaling; layer_idx: the model layer (for the steps' record).

    Returns:
        ``(out [R, Hq, D], selections)``: ``selections[r]`` is ``[1, Hkv, M_r]`` in the request's own positions
        (``M_r = sinks + recent + budget_tokens(seq_lens[r])``), or ``None`` where the budget covers the context
        and the step is plain attention over all of it.
    """
    out = torch.empty_like(query)
    selections: list[Selection | None] = []
    for r, n in enumerate(seq_lens.tolist()):
        step = layer.request_step(query[r], block_table[r], n, scale, layer_idx)
        if Selector().covers(policy, n):  # plain attention over everything, as in generate
            everything = Selection(torch.arange(n).expand(1, step.key.shape[1], n),
                                   torch.ones(1, step.key.shape[1], n, dtype=torch.bool))
            out[r] = attend_rows(step.query, step.key, step.value, everything, scale)[0, 0]
            selections.append(None)
            continue
        result, selection = hash_plan(policy, query_codes[r : r + 1], policy.budget_tokens(n)).attend(step)
        out[r] = result[0, 0]
        selections.append(selection)
    return out, selections


def write_at_slots(slot_mapping: torch.Tensor, *writes: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Store new tokens' rows at their slots, for each ``(paged, rows)`` of ``writes`` (codes, keys, values: the slot
    arithmetic is done once for all): ``paged [num_blocks, Hkv, block_size, X]`` (a logical view, any strides; one
    block size for all), ``rows [T, Hkv, X]``; ``slot_mapping [T]`` (negative: padding, skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = writes[0][0].shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    for paged, rows in writes:
        paged[blocks, :, offsets] = rows[keep].to(paged.dtype)


def store_at_slots(slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_projections: torch.Tensor,
                   key_cache: torch.Tensor, value_cache: torch.Tensor, code_cache: torch.Tensor) -> None:
    """New tokens' keys, values and key codes at their slots (what a hashed layer writes each step):
    :func:`write_at_slots` of ``key``, ``value`` ``[T, Hkv, D]`` into ``key_cache``, ``value_cache`` and of the signs
    of ``key_projections`` ``[Hkv, T, bits]`` (the key encoder's output, ``LayerEncoders.key_projections``), packed as
    ``codes.pack_signs`` packs them, into ``code_cache``. ``kernels.store_paged`` is this, compiled."""
    codes = pack_signs(key_projections).transpose(0, 1)  # [T, Hkv, nbytes]
    write_at_slots(slot_mapping, (key_cache, key), (value_cache, value), (code_cache, codes))
