"""Tier 2 of DASH-KV's dynamic mixed precision (arXiv 2604.19351): keys just beyond the exact budget still count,
with a logit approximated from the codes.

This module owns that decision: which rows are tier 2 (the ``tier2_tokens`` nearest after tier 1) and what
their logit is; ``attention.attend_tiers`` runs one softmax over both tiers. Tier-1 rows get the exact
``q . k * scale``; a tier-2 row of query head ``h`` gets

    ``w[h, 0] * s + w[h, 1] + w[h, 2] * ||q_h||``,  ``s = (bits - 2 * hamming) / bits``,

the hash inner product in +-1 space, scaled, plus a residual from what the query gives. The true logit is
``scale * ||q|| * ||k|| * cos``: ``s`` estimates the angle; the query norm sets how far this step's logits
spread, and so where tier 2 sits against the exact tier-1 logits (a per-key term such as ``||k||`` would need a
value stored per cached token). In a one-sequence check on SmolLM2 (budget 1/32, tier 2 the next 1/32), the
query-norm term lowered the attention output error from 0.151 to 0.148; 64 per-bit weights per head instead did
not lower it. Values stay exact for both tiers; the rest (tier 3) is skipped for this step.
"""

from __future__ import annotations

import torch

from .codes import hamming_distance, nearest
from .selection import row_mask

def tier2_rows(
    distances: torch.Tensor, candidates: torch.Tensor, rows: torch.Tensor, row_valid: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest candidates that tier 1 did not take, per KV head.

    Args:
        distances: ``[B, Hkv, N]``, the (calibrated) distances tier 1 was selected by; candidates: bool
            ``[B, N]``; rows, row_valid: tier 1, ``[B, Hkv, M]``.

    Returns:
        ``(rows, valid)``, each ``[B, Hkv, k]``, as ``codes.nearest`` gives them.
    """
    left = candidates.unsqueeze(1) & ~row_mask(rows, row_valid, distances.shape[-1])
    return nearest(distances, left, k)


def tier2_features(query: torch.Tensor, query_codes: torch.Tensor, row_codes: torch.Tensor) -> torch.Tensor:
    """The inputs of the tier-2 logit, float ``[B, Hkv, G, M, 3]``: hash similarity ``s``, 1, query norm.

    Args:
        query: ``[B, Hq, 1, D]``; query_codes: ``[B, Hkv, G, nbytes]``; row_codes: the tier-2 rows' key codes,
            ``[B, Hkv, M, nbytes]``.
    """
    bits = query_codes.shape[-1] * 8
    similarity = 1 - 2 * hamming_distance(query_codes.unsqueeze(-2), row_codes.unsqueeze(-3)).float() / bits
    norm = query[:, :, 0].float().norm(dim=-1).view(query_codes.shape[:3] + (1,)).expand_as(similarity)
    return torch.stack([similarity, torch.ones_like(similarity), norm], dim=-1)


def tier2_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``features [B, Hkv, G, M, 3] @ weight [Hq, 3]`` per query head -> ``[B, Hkv, G, M]``."""
    kv_heads, group = features.shape[1:3]
    return (features * weight.view(kv_heads, group, 1, -1)).sum(-1)
