"""The "dashkv" attention function: exact attention over the rows DASH-KV selects at a decode step.

Registered with transformers on ``import hf_dashkv`` (with the sdpa mask, so padding is honoured), so that
``from_pretrained(..., attn_implementation="dashkv")`` uses it. The decode path reads in one direction:
the cache's ``update`` has stored and hashed the new key -> the query is encoded -> rows are selected ->
exact attention runs over those rows only. On the CPU the hash selector's whole step is one compiled kernel;
the baselines of ``hf_dashkv.selectors`` take the same path in PyTorch. With DASH-KV's optional learned terms
(arXiv 2604.19351) on, the hash step runs in PyTorch as :func:`learned_decode`: calibrated distances
(``calibration``) -> tier-1 rows (``selection``) -> tier-2 rows and their approximate logits (``tiers``) ->
one softmax over both (:func:`attend_tiers`). Everything else (prefill, dense layers, sliding layers, another
cache or none, a budget that covers the context) is plain SDPA, so it is exact by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import kernels
from .cache import take_pending
from .calibration import calibrated_distances, remember_selection
from .codes import head_distances, reduce_group
from .config import DashKVConfig
from .encoders import LayerEncoders
from .selection import candidate_mask, first_valid, select_rows
from .selectors import selector_distances
from .tiers import tier2_features, tier2_logits, tier2_rows


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
    if config.learned_terms:
        step = learned_decode(
            query, key, value, valid, layer.encoders, layer.key_codes, config, scale, module.layer_idx
        )
        out, rows, row_valid = step.output, step.rows, step.row_valid
    elif config.selector == "hash" and left_padded and kernels.supports_decode(key, value):
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


class LearnedStep(NamedTuple):
    """One decode step with the learned terms: its output ``[B, 1, Hq, D]``, tier 1 (``rows``/``row_valid``
    ``[B, Hkv, M1]``) and tier 2 (``tier2_rows``/``tier2_valid`` ``[B, Hkv, M2]``, ``tier2_features``
    ``[B, Hkv, G, M2, 3]``; ``None`` when tier 2 is off)."""

    output: torch.Tensor
    rows: torch.Tensor
    row_valid: torch.Tensor
    tier2_rows: torch.Tensor | None
    tier2_valid: torch.Tensor | None
    tier2_features: torch.Tensor | None


def learned_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    encoders: LayerEncoders,
    key_codes: torch.Tensor,
    config: DashKVConfig,
    scale: float,
    layer_idx: int,
) -> LearnedStep:
    """A hashed layer's decode step with the configured learned terms (calibration, tier 2), in PyTorch.

    Args:
        query: ``[B, Hq, 1, D]``; key, value: ``[B, Hkv, N, D]``; valid: bool ``[B, N]`` or ``None``;
        encoders: the layer's ``LayerEncoders``; key_codes: ``[B, Hkv, N, nbytes]``; config: flags and budgets;
        scale: the attention scaling; layer_idx: the layer's index in the model (orders the temporal record).
    """
    n = key.shape[2]
    query_codes = encoders.encode_query(query[:, :, 0])
    per_head = head_distances(query_codes, key_codes)
    distances = reduce_group(per_head, config.group_reduce)
    candidates = candidate_mask(valid, first_valid(valid, key.shape[0], key.device)[0], n, config)
    if config.calibrated:
        distances = calibrated_distances(per_head, distances, candidates, encoders.calibration, config, layer_idx)
    rows, row_valid = select_rows(distances, valid, config)
    if config.temporal_calibration:
        remember_selection(config, layer_idx, rows, row_valid, n)
    tier2 = config.tier2_tokens(n)
    if not tier2:  # calibration only: the same attention as plain hashing
        return LearnedStep(attend_rows(query, key, value, rows, row_valid, scale), rows, row_valid, None, None, None)
    rows2, valid2 = tier2_rows(distances, candidates, rows, row_valid, tier2)
    features = tier2_features(query, query_codes, gather_rows(key_codes, rows2))
    logits2 = tier2_logits(features, encoders.tier2.weight)
    out = attend_tiers(query, key, value, rows, row_valid, rows2, valid2, logits2, scale)
    return LearnedStep(out, rows, row_valid, rows2, valid2, features)


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


def attend_tiers(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor,
    row_valid: torch.Tensor,
    rows2: torch.Tensor,
    valid2: torch.Tensor,
    logits2: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One softmax over exact tier-1 logits and approximate tier-2 logits (``hf_dashkv.tiers``); exact values for both.

    Args:
        query: ``[B, Hq, 1, D]``; key, value: ``[B, Hkv, N, D]``; rows, row_valid: tier 1 ``[B, Hkv, M1]``;
        rows2, valid2: tier 2 ``[B, Hkv, M2]``; logits2: ``[B, Hkv, G, M2]``; scale: the attention scaling.

    Returns:
        ``[B, 1, Hq, D]`` in the query's dtype.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim).float()
    exact = torch.einsum("bkgd,bkmd->bkgm", q, gather_rows(key, rows).float()) * scale
    exact = exact.masked_fill(~row_valid.unsqueeze(2), float("-inf"))
    logits = torch.cat([exact, logits2.masked_fill(~valid2.unsqueeze(2), float("-inf"))], dim=-1)
    values = torch.cat([gather_rows(value, rows), gather_rows(value, rows2)], dim=2).float()
    out = logits.softmax(-1) @ values  # [B, Hkv, G, D]
    return out.reshape(batch, heads, 1, -1).transpose(1, 2).to(query.dtype)


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
