"""Oracle: the tokens with the most true attention mass, from exact scores. The ceiling for any selector.

With one selection per KV head (as DASH-KV makes), the best set holds the keys with the largest attention
probability summed over the group's query heads; the score is minus that sum. It reads every key at every
step, so it is a measuring stick, not a speed-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policy import DecodePolicy
from ..step import DecodeStep
from .base import Selector


@dataclass
class OracleSelector(Selector):
    """Exact attention probabilities, summed over the GQA group (always: that is the best set for the group)."""

    def scores(self, step: DecodeStep, policy: DecodePolicy) -> torch.Tensor:
        """Minus the group's summed softmax over every cached key (sinks and the recent window change no ranking)."""
        batch, heads, _, dim = step.query.shape
        kv_heads = step.key.shape[1]
        q = step.query[:, :, 0].reshape(batch, kv_heads, heads // kv_heads, dim).float()
        probs = torch.einsum("bkgd,bknd->bkgn", q, step.key.float()).mul(step.scale).softmax(-1)
        return -probs.sum(2)
