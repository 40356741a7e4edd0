"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks + a recent window, nothing else.

No token is chosen by content: the budget is 0 (``DashKVConfig.budget_tokens``), and every score is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DecodeStep, Selector


@dataclass
class StreamingSelector(Selector):
    """Sinks + recent window only."""

    def scores(self, step: DecodeStep) -> torch.Tensor:
        """Zeros ``[B, Hkv, N]`` (a broadcast view, no memory)."""
        key = step.key
        return torch.zeros(1, 1, 1, device=key.device).expand(key.shape[0], key.shape[1], key.shape[2])
