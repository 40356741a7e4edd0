"""Spatial and temporal calibration of Hamming distances (DASH-KV, arXiv 2604.19351: ``D_hamming + d_spatial +
d_temporal``), the optional discounts applied before the budget's nearest keys are taken.

This module owns that decision: ``D_final = D - w_spatial * votes - w_temporal * previous``, with the layer's
fitted weights (``LayerEncoders.calibration``, >= 0) and

- ``votes``: how many query heads of this layer have the key among their own ``budget`` nearest. Query heads,
  not KV heads: the selection is shared by a GQA group, so a vote per KV head would only repeat the group's own
  ranking; per query head the count is finer (0..Hq) and it measured better on SmolLM2 (+0.3 vs +0.1 points of
  recall at budget 1/32);
- ``previous``: whether the previous hashed layer selected the key at the same decode step, in any of its KV
  heads (head ``h`` of one layer has no relation to head ``h`` of the next; any-head measured better than
  same-head). The attention runs layer by layer, so each layer leaves its selection in a thread-local record
  for the next one (:func:`remember_selection`).

Distances stay integers: the weights act in steps of ``1 / STEPS`` distance units, so ranking keeps the plain
integer order, ties to the later position included, and zero weights select exactly what plain hashing does.
"""

from __future__ import annotations

import threading

import torch

from .codes import nearest
from .config import DashKVConfig
from .selection import row_mask

STEPS = 16

_record = threading.local()


def spatial_votes(head_distances: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """How many query heads rank each key among their ``k`` nearest candidates: int64 ``[B, N]``.

    Args:
        head_distances: int ``[B, Hkv, G, N]`` (``codes.head_distances``); candidates: bool ``[B, N]``.
    """
    batch, n = candidates.shape
    per_head = head_distances.reshape(batch, -1, n)
    rows, ok = nearest(per_head, candidates.unsqueeze(1).expand_as(per_head), k)
    return row_mask(rows, ok, n).sum(1)


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


def remember_selection(owner: DashKVConfig, layer_idx: int, rows: torch.Tensor, row_valid: torch.Tensor, n: int):
    """Record this layer's tier-1 selection (``[B, Hkv, M]``) as bool ``[B, N]`` (any KV head) for the next layer."""
    _record.value = (owner, layer_idx, n, row_mask(rows, row_valid, n).any(1))


def previous_selection(owner: DashKVConfig, layer_idx: int, n: int, batch: int) -> torch.Tensor | None:
    """The record of an earlier hashed layer at this same decode step, bool ``[B, N]``, or ``None``.

    Same step: same config (the cache's), same cache length and batch, from a lower layer index. A forward pass
    runs its layers in order, so the first hashed layer of a step never reads a record from an earlier step.
    """
    record = getattr(_record, "value", None)
    if record is None:
        return None
    owner_then, layer_then, n_then, mask = record
    if owner_then is not owner or n_then != n or layer_then >= layer_idx or mask.shape[0] != batch:
        return None
    return mask


def calibrated_distances(
    head_distances: torch.Tensor,
    distances: torch.Tensor,
    candidates: torch.Tensor,
    weights,
    config: DashKVConfig,
    layer_idx: int,
) -> torch.Tensor:
    """The configured calibration of one decode step's distances: int64 ``[B, Hkv, N]``.

    Args:
        head_distances: int ``[B, Hkv, G, N]``; distances: their group reduction ``[B, Hkv, N]``;
        candidates: bool ``[B, N]``; weights: the layer's ``CalibrationWeights``; config: the flags and budget;
        layer_idx: this layer's index in the model (orders the temporal record).
    """
    batch, _, n = distances.shape
    votes = spatial_votes(head_distances, candidates, config.budget_tokens(n)) if config.spatial_calibration else None
    previous = previous_selection(config, layer_idx, n, batch) if config.temporal_calibration else None
    return calibrate(distances, votes, previous, weights.spatial, weights.temporal)
