"""Tier 2 of DASH-KV's dynamic mixed precision (arXiv 2604.19351): keys just beyond the exact budget still count,
with a logit approximated from the codes.

A wrapper around the hash selector (calibrated or not): tier 1 is its selection; tier 2 the ``tier2_tokens``
nearest candidates after it, by the same distances. Tier-1 rows get the exact ``q . k * scale``; a tier-2 row of
query head ``h`` gets

    ``w[h, 0] * s + w[h, 1] + w[h, 2] * ||q_h||``,  ``s = (bits - 2 * hamming) / bits``,

the hash inner product in +-1 space, scaled, plus a residual from what the query gives. The true logit is
``scale * ||q|| * ||k|| * cos``: ``s`` estimates the angle; the query norm sets how far this step's logits
spread, and so where tier 2 sits against the exact tier-1 logits (a per-key term such as ``||k||`` would need a
value stored per cached token; what each term measured is in docs/). Values stay exact for both tiers; the rest
(tier 3) is skipped for this step. The plan is a :class:`TieredPlan`, which only the PyTorch backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codes import hamming_distance, nearest
from ..exact import attend_tiers, gather_rows
from ..plans import Plan
from ..policy import DecodePolicy
from ..selection import Selection
from ..step import DecodeStep
from .base import Selector
from .hash import HashSelector


@dataclass(frozen=True)
class Tiers:
    """One step's tiers: ``tier1``/``tier2`` selections ``[B, Hkv, M1]``/``[B, Hkv, M2]``, the tier-2 logit inputs
    ``features [B, Hkv, G, M2, 3]`` (what ``lightning_modules.calibration`` fits on), and the attention output
    ``[B, 1, Hq, D]`` over both tiers."""

    tier1: Selection
    tier2: Selection
    features: torch.Tensor
    output: torch.Tensor


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


@dataclass(frozen=True)
class TieredPlan(Plan):
    """Tier 1: ``budget`` candidates by ``scores`` ``[B, Hkv, N]`` (exact logits); tier 2: the next ``tier2`` by the
    same scores, with the logit ``features @ weight`` (``weight [Hq, 3]``, the layer's fitted terms) from the
    query's codes ``query_codes [B, Hkv, G, nbytes]``."""

    scores: torch.Tensor
    query_codes: torch.Tensor
    tier2: int
    weight: torch.Tensor

    def rank(self, step: DecodeStep) -> torch.Tensor:
        return self.scores

    def tiers(self, step: DecodeStep) -> Tiers:
        """Both tiers of the step and the attention over them."""
        tier1 = self.select(step)
        left = self.candidates(step).unsqueeze(1) & ~tier1.mask(step.n)
        tier2 = Selection(*nearest(self.scores, left, self.tier2))
        features = tier2_features(step.query, self.query_codes, gather_rows(step.key_codes, tier2.rows))
        logits = tier2_logits(features, self.weight)
        out = attend_tiers(step.query, step.key, step.value, tier1, tier2, logits, step.scale)
        return Tiers(tier1, tier2, features, out)

    def attend(self, step: DecodeStep) -> tuple[torch.Tensor, Selection]:
        tiers = self.tiers(step)
        return tiers.output, tiers.tier1


@dataclass
class Tier2Selector(Selector):
    """``inner``'s ranking for tier 1, plus ``policy.tier2_tokens`` rows with the layer's fitted tier-2 logit."""

    inner: HashSelector

    def plan_type(self, policy: DecodePolicy) -> type[Plan]:
        return TieredPlan

    def check(self, policy: DecodePolicy) -> None:
        pass

    def plan(self, step: DecodeStep, policy: DecodePolicy) -> TieredPlan:
        query_codes, per_head = self.inner.head_distances(step)
        return TieredPlan(policy.sink_tokens, policy.recent_tokens, self.budget(policy, step.n),
                          self.inner.scores_from(step, policy, per_head), query_codes, policy.tier2_tokens(step.n),
                          self.inner.encoders.tier2.weight)
