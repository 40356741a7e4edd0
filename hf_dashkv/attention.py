"""The "dashkv" attention function: exact attention over the rows DASH-KV selects at a decode step.

Registered with transformers on ``import hf_dashkv`` (with the sdpa mask, so padding is honoured), so that
``from_pretrained(..., attn_implementation="dashkv")`` uses it. The decode path reads in one direction:
the cache's ``update`` has stored and hashed the new key -> the query is encoded -> rows are selected ->
exact attention runs over those rows only. On the CPU the hash selector's whole step is one compiled kernel;
the baselines of ``hf_dashkv.selectors`` take the same path in PyTorch. Everything else (prefill, dense
layers, sliding layers, another cache or none, a budget that covers the context) is plain SDPA, so it is
exact by construction.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import kernels
from .cache import take_pending
from .selection import first_valid, select_rows
from .selectors import selector_distances


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
    config = layer.config
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    valid = key_validity(attention_mask, key)
    first, left_padded = first_valid(valid, key.shape[0], key.device)
    if config.selector == "hash" and left_padded and kernels.supports_decode(key, value):
        query_codes = layer.encoders.encode_query(query[:, :, 0])
        out, rows, row_valid = kernels.decode_attention(
            query, query_codes, key, value, layer.key_codes, first, config.sink_tokens, config.recent_tokens,
            config.budget_tokens(n), config.group_reduce, scale,
        )
    else:
        distances = selector_distances(query[:, :, 0], key, layer, config, scale)
        rows, row_valid = select_rows(distances, valid, config)
        out = attend_rows(query, key, value, rows, row_valid, scale)
    layer.last_selection = (rows, row_valid)
    return out, None


def key_validity(attention_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """Which keys the (single) query may see, bool ``[B, N]``, from a 4D bool or additive mask; ``None`` for all."""
    batch, n = key.shape[0], key.shape[2]
    if attention_mask is None:
        return None
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
    k, v = gather_rows(key, rows), gather_rows(value, rows)
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=row_valid.unsqueeze(2), scale=scaling)
    return out.reshape(batch, heads, 1, -1).transpose(1, 2)


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
