"""Selectors: what picks the budget's tokens at a decode step. One method per file, one mechanism for all.

Every selector gives a distance per cached token and KV head (lower is nearer); ``selection.select_rows`` adds
the sinks and the recent window and takes the ``budget`` nearest, and ``attention.attend_rows`` runs exact
attention over them. So DASH-KV and its baselines share the cache, the selection rule and the attention, and a
comparison between them differs only in the distances.
"""

from __future__ import annotations

import torch

from ..config import DashKVConfig
from .hash import hash_distances
from .oracle import oracle_distances
from .quest import quest_distances
from .streaming import streaming_distances

_DISTANCES = {
    "hash": hash_distances,
    "oracle": oracle_distances,
    "quest": quest_distances,
    "streaming": streaming_distances,
}


def selector_distances(
    query: torch.Tensor, key: torch.Tensor, layer, config: DashKVConfig, scale: float
) -> torch.Tensor:
    """Distances ``[B, Hkv, N]`` of the configured selector for one decode step.

    Args:
        query: ``[B, Hq, D]``; key: ``[B, Hkv, N, D]``; layer: the DashKVLayer (its codes, for hashing);
        config: the selector and its parameters; scale: the attention scaling (for exact scores).
    """
    return _DISTANCES[config.selector](query, key, layer, config, scale)


def needs_encoders(config: DashKVConfig) -> bool:
    """Whether the configured selector hashes (and so needs HashEncoders)."""
    return config.selector == "hash"
