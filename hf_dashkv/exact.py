"""Exact attention of one decode step over selected rows only: the last stage of a sparse decode step.

The rows come from a :class:`~hf_dashkv.selection.Selection` (shared by the query heads of each KV head's group);
keys and values are read straight from the cache. Tier 2 of DASH-KV's mixed precision (``selectors.tiers``) adds
rows with approximate logits to the same softmax (:func:`attend_tiers`).
"""

from __future__ import annotations

import torch

from .selection import Selection


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[b, h, rows[b, h, m]]`` for ``x [B, H, N, D]`` and ``rows [B, H, M]`` -> ``[B, H, M, D]``.

    One ``index_select`` of whole rows over the storage (each cached head is a block of contiguous rows,
    also in the cache's over-allocated buffer): copies rows, where ``torch.gather`` reads one index per value.
    """
    batch, heads, _, dim = x.shape
    if x.stride(-1) != 1 or x.stride(-2) != dim or x.stride(1) % dim or x.stride(0) % dim:
        x = x.contiguous()
    head_start = (torch.arange(batch, device=x.device).view(-1, 1, 1) * (x.stride(0) // dim)
                  + torch.arange(heads, device=x.device).view(1, -1, 1) * (x.stride(1) // dim))
    flat = (head_start + rows).reshape(-1)
    span = (batch - 1) * (x.stride(0) // dim) + (heads - 1) * (x.stride(1) // dim) + x.shape[2]
    table = x.as_strided((span, dim), (dim, 1))
    return table.index_select(0, flat).view(batch, heads, -1, dim)


def attend_rows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: Selection, scale: float
) -> torch.Tensor:
    """Softmax attention of one query step over the selected rows.

    Args:
        query: ``[B, Hq, 1, D]``; key, value: ``[B, Hkv, N, D]``; selection: ``[B, Hkv, M]``; scale: the scaling.

    Returns:
        ``[B, 1, Hq, D]``, the layout transformers' attention functions return.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    k, v = gather_rows(key, selection.rows), gather_rows(value, selection.rows)
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=selection.valid.unsqueeze(2), scale=scale)
    return out.reshape(batch, heads, 1, -1).transpose(1, 2)


def attend_tiers(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tier1: Selection,
    tier2: Selection,
    logits2: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One softmax over exact tier-1 logits and approximate tier-2 logits; exact values for both.

    Args:
        query: ``[B, Hq, 1, D]``; key, value: ``[B, Hkv, N, D]``; tier1: ``[B, Hkv, M1]``; tier2: ``[B, Hkv, M2]``;
        logits2: ``[B, Hkv, G, M2]``; scale: the attention scaling.

    Returns:
        ``[B, 1, Hq, D]`` in the query's dtype.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim).float()
    exact = torch.einsum("bkgd,bkmd->bkgm", q, gather_rows(key, tier1.rows).float()) * scale
    exact = exact.masked_fill(~tier1.valid.unsqueeze(2), float("-inf"))
    logits = torch.cat([exact, logits2.masked_fill(~tier2.valid.unsqueeze(2), float("-inf"))], dim=-1)
    values = torch.cat([gather_rows(value, tier1.rows), gather_rows(value, tier2.rows)], dim=2).float()
    out = logits.softmax(-1) @ values  # [B, Hkv, G, D]
    return out.reshape(batch, heads, 1, -1).transpose(1, 2).to(query.dtype)
