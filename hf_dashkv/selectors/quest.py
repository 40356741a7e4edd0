"""Quest (Tang et al., ICML 2024, arXiv 2406.10774): training-free, query-aware page selection.

Keys are grouped in pages of ``page_size`` tokens; each page keeps the element-wise minimum and maximum of its
keys. ``sum_d max(q_d * min_d, q_d * max_d)`` is an upper bound on ``q . k`` for every key of the page, and the
pages with the largest bound (summed over the GQA group) are selected. Every token gets its page's bound, so
taking the budget nearest tokens takes whole pages, best first. Here the bounds are computed from the keys at
each step (Quest keeps them as the cache grows); that changes the cost, not which tokens are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policy import DecodePolicy
from ..step import DecodeStep
from .base import Selector


@dataclass
class QuestSelector(Selector):
    """Per-page key bounds; pages of ``page_size`` tokens."""

    page_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or isinstance(self.page_size, bool) or self.page_size < 1:
            raise ValueError(f"QuestSelector.page_size={self.page_size!r}: must be an int >= 1.")

    def scores(self, step: DecodeStep, policy: DecodePolicy) -> torch.Tensor:
        """Minus each token's page bound, summed over the group: float ``[B, Hkv, N]``."""
        batch, heads, _, dim = step.query.shape
        kv_heads, n = step.key.shape[1], step.n
        page = self.page_size
        pages = -(-n // page)
        padded = torch.nn.functional.pad(step.key.float(), (0, 0, 0, pages * page - n), value=float("nan"))
        blocks = padded.view(batch, kv_heads, pages, page, dim)
        low, high = blocks.nan_to_num(float("inf")).amin(3), blocks.nan_to_num(float("-inf")).amax(3)
        q = step.query[:, :, 0].reshape(batch, kv_heads, heads // kv_heads, 1, dim).float()
        bound = torch.maximum(q * low.unsqueeze(2), q * high.unsqueeze(2)).sum(-1).sum(2)  # [B, Hkv, pages]
        return -bound.repeat_interleave(page, dim=-1)[..., :n]
