"""Spatial and temporal calibration of Hamming distances (DASH-KV, arXiv 2604.19351: ``D_hamming + d_spatial +
d_temporal``): discounts applied to the hash selector's distances before the budget's nearest keys are taken.

``D_final = D - w_spatial * votes - w_temporal * previous``, with the layer's fitted weights
(``LayerEncoders.calibration``, >= 0) and

- ``votes``: how many query heads of this layer have the key among their own ``budget`` nearest. Query heads,
  not KV heads: the selection is shared by a GQA group, so a vote per KV head would only repeat the group's own
  ranking; per query head the count is finer (0..Hq) and it measured better (docs/experiments.md);
- ``previous``: whether the previous hashed layer selected the key at the same decode step, in any of its KV
  heads (head ``h`` of one layer has no relation to head ``h`` of the next; any-head measured better than
  same-head, docs/experiments.md). Layers run in order, so each leaves its selection in the cache's ``DecodeRecord`` for the next.

Distances stay integers: the weights act in steps of ``1 / STEPS`` distance units, so ranking keeps the plain
integer order, ties to the later position included, and zero weights select exactly what plain hashing does.
The plan is a ``ScorePlan`` of the discounted distances, which the PyTorch backend runs. The fitting lives in
``lightning_modules.calibration``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codes import nearest
from ..policy import DecodePolicy
from ..selection import Selection, combine_group
from ..step import DecodeStep
from .base import Selector
from .hash import HashSelector

STEPS = 16


def spatial_votes(head_distances: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """How many query heads rank each key among their ``k`` nearest candidates: int64 ``[B, N]``.

    Args:
        head_distances: int ``[B, Hkv, G, N]``; allowed: bool ``[B, N]``, the candidates.
    """
    batch, n = allowed.shape
    per_head = head_distances.reshape(batch, -1, n)
    rows, ok = nearest(per_head, allowed.unsqueeze(1).expand_as(per_head), k)
    return Selection(rows, ok).mask(n).sum(1)


def calibrate(
    distances: torch.Tensor,
    votes: torch.Tensor | None,
    previous: torch.Tensor | None,
    spatial: torch.Tensor | float,
    temporal: torch.Tensor | float,
) -> torch.Tensor:
    """``D * STEPS - round(w_s * STEPS) * votes - round(w_t * STEPS) * previous`` as int64 ``[..., Hkv, N]``.

    Args:
        distances: int ``[..., Hkv, N]``; votes, previous: ``[..., N]`` (shared by the KV heads), or ``None`` for
            a term that is off; spatial, temporal: weights in distance units (negative ones count as 0).
    """
    out = distances.long() * STEPS
    for term, weight in ((votes, spatial), (previous, temporal)):
        if term is not None:
            step = torch.as_tensor(weight, device=out.device).mul(STEPS).round().clamp(min=0).long()
            out = out - step * term.long().unsqueeze(-2)
    return out


def remember_selection(step: DecodeStep, selection: Selection) -> None:
    """An observer (``DecodeRecord.observers``) that leaves each hashed layer's selection for the next layer of the
    same step: what temporal calibration reads (any KV head's choice counts)."""
    step.record.previous = (step.layer_idx, step.n, selection.mask(step.n).any(1))


@dataclass
class CalibratedSelector(HashSelector):
    """The hash selector with the policy's discounts (``spatial_calibration`` / ``temporal_calibration``), weighted
    by the layer's fitted ``encoders.calibration``. The cache that uses it registers :func:`remember_selection`."""

    # a plan of its scores, as every score-based selector makes (not the hash selector's code plan)
    plan_type = Selector.plan_type
    plan = Selector.plan

    def previous(self, step: DecodeStep) -> torch.Tensor | None:
        """The selection an earlier hashed layer left at this same step, bool ``[B, N]``, or ``None``.

        Same step: same cache length and batch, from a lower layer (a forward pass runs its layers in order, so the
        first hashed layer of a step never reads a record of the step before).
        """
        record = step.record.previous
        if record is None:
            return None
        layer_then, n_then, mask = record
        if n_then != step.n or layer_then >= step.layer_idx or mask.shape[0] != step.key.shape[0]:
            return None
        return mask

    def scores_from(self, step: DecodeStep, policy: DecodePolicy, per_head: torch.Tensor) -> torch.Tensor:
        weights = self.encoders.calibration
        distances = combine_group(per_head, policy.group_reduce)
        votes = None
        if policy.spatial_calibration:
            allowed = step.candidates(policy.sink_tokens, policy.recent_tokens)
            votes = spatial_votes(per_head, allowed, self.budget(policy, step.n))
        previous = self.previous(step) if policy.temporal_calibration else None
        return calibrate(distances, votes, previous, weights.spatial, weights.temporal)
