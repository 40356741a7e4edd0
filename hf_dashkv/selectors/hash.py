"""DASH-KV hashing (arXiv 2604.19351): Hamming distance between the query's code and each cached key's code.

Keys were hashed once, as the cache stored them; the query is hashed here. The query heads of a GQA group
combine their distances (``DecodePolicy.group_reduce``), so they share one selection. The plan is a
``CodePlan`` (or, with ``DecodePolicy.rerank > 1``, a ``RerankPlan``: the codes shortlist, exact scores keep the
budget); the layer's backend runs it (``hf_dashkv.backends``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codes import head_distances, head_distances_many
from ..encoders import LayerEncoders
from ..plans import CodePlan, Plan, RerankPlan
from ..policy import DecodePolicy
from ..selection import combine_group
from ..step import DecodeStep
from .base import Selector


@dataclass
class HashSelector(Selector):
    """Nearest keys in Hamming space, with the layer's trained (or random: SimHash) ``encoders``."""

    encoders: LayerEncoders

    def plan_type(self, policy: DecodePolicy) -> type[Plan]:
        return RerankPlan if policy.rerank > 1 else CodePlan

    def check(self, policy: DecodePolicy) -> None:
        pass  # every policy field acts on hash codes

    def plan(self, step: DecodeStep, policy: DecodePolicy) -> Plan:
        return hash_plan(policy, self.encoders.encode_query(step.query[:, :, 0]), self.budget(policy, step.n))

    def head_distances(self, step: DecodeStep) -> tuple[torch.Tensor, torch.Tensor]:
        """The query's codes ``[B, Hkv, G, nbytes]`` and each query head's distances, int32 ``[B, Hkv, G, N]``."""
        query_codes = self.encoders.encode_query(step.query[:, :, 0])
        return query_codes, head_distances(query_codes, step.key_codes)

    def scores_from(self, step: DecodeStep, policy: DecodePolicy, per_head: torch.Tensor) -> torch.Tensor:
        """The group's combined distances ``[B, Hkv, N]`` from per-head ones (subclasses add their terms here)."""
        return combine_group(per_head, policy.group_reduce)

    def scores(self, step: DecodeStep, policy: DecodePolicy) -> torch.Tensor:
        return self.scores_from(step, policy, self.head_distances(step)[1])


def hash_plan(policy: DecodePolicy, query_codes: torch.Tensor, budget: int) -> CodePlan:
    """The plan of a query with codes ``[B, Hkv, G, nbytes]`` and ``budget`` tokens: a :class:`RerankPlan` of
    ``policy.rerank x budget`` with ``policy.rerank > 1``, else a :class:`CodePlan` (also the paged reference's)."""
    if policy.rerank > 1:
        return RerankPlan(policy.sink_tokens, policy.recent_tokens, budget, query_codes, policy.group_reduce,
                          policy.rerank * budget)
    return CodePlan(policy.sink_tokens, policy.recent_tokens, budget, query_codes, policy.group_reduce)


def position_distances(encoders: LayerEncoders, query: torch.Tensor, key_codes: torch.Tensor,
                       group_reduce: str) -> torch.Tensor:
    """A decode step's distances for many query positions at once (training, measurement), by sign matmul.

    Args:
        encoders: the layer's; query: post-RoPE ``[B, Hq, P, D]``; key_codes: ``[B, Hkv, N, nbytes]``;
        group_reduce: ``"sum"`` or ``"min"``.

    Returns:
        int32 ``[B, Hkv, P, N]``, what a :class:`CodePlan` ranks by at each position.
    """
    batch, length = query.shape[0], query.shape[2]
    query_codes = encoders.encode_query(query.transpose(1, 2).flatten(0, 1))  # [B * P, Hkv, G, nbytes]
    query_codes = query_codes.unflatten(0, (batch, length)).transpose(1, 2)  # [B, Hkv, P, G, nbytes]
    return combine_group(head_distances_many(query_codes, key_codes), group_reduce)
