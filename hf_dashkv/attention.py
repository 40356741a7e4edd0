"""The "dashkv" attention function: exact attention over the rows DASH-KV selects at a decode step.

Registered with transformers on ``import hf_dashkv`` (with the sdpa mask, so padding is honoured), so that
``from_pretrained(..., attn_implementation="dashkv")`` uses it. The decode path reads in one direction:
the cache's ``update`` has stored and hashed the new key -> the query is encoded -> rows are selected ->
exact attention runs over those rows only. Everything else (prefill, dense layers, sliding layers, another
cache or none, a budget that covers the context) is plain SDPA, so it is exact by construction.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import take_pending
from .selection import select_rows


def dashkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``query [B, Hq, q, D]``, ``key/value [B, Hkv, N, D]`` -> ``[B, q, Hq, D]``."""
    layer = take_pending(key)
    n = key.shape[2]
    if layer is None or query.shape[2] != 1 or layer.config.exact_tokens(n) >= n:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    valid = key_validity(attention_mask, key)
    query_codes = layer.encoders.encode_query(query[:, :, 0])
    rows, row_valid = select_rows(query_codes, layer.key_codes, valid, layer.config)
    layer.last_selection = (rows, row_valid)
    return attend_rows(query, key, value, rows, row_valid, scaling), None


def key_validity(attention_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """Which keys the (single) query may see, bool ``[B, N]``, from a 4D bool or additive mask (or ``None``)."""
    batch, n = key.shape[0], key.shape[2]
    if attention_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=key.device)
    last = attention_mask[:, 0, -1, -n:]
    if last.dtype != torch.bool:
        last = last > torch.finfo(last.dtype).min / 2
    return last.expand(batch, n)


def attend_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor,
    row_valid: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Exact softmax attention of one query step over selected rows only.

    Args:
        query: ``[B, Hq, 1, D]``; key, value: ``[B, Hkv, N, D]``.
        rows, row_valid: ``[B, Hkv, M]`` from :func:`hf_dashkv.selection.select_rows`, shared by the query heads
            of each KV head's group.

    Returns:
        ``[B, 1, Hq, D]``, the layout transformers' attention functions return.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    index = rows.unsqueeze(-1)
    k = key.gather(2, index.expand(-1, -1, -1, key.shape[-1]))
    v = value.gather(2, index.expand(-1, -1, -1, value.shape[-1]))
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=row_valid.unsqueeze(2), scale=scaling)
    return out.reshape(batch, heads, 1, -1).transpose(1, 2)
