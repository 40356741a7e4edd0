"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks + a recent window, nothing else.

No token is chosen by content: whatever the policy's budget, this selector's is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policy import DecodePolicy
from ..step import DecodeStep
from .base import Selector


@dataclass
class StreamingSelector(Selector):
    """Sinks + recent window only."""

    def budget(self, policy: DecodePolicy, n: int) -> int:
        return 0

    def scores(self, step: DecodeStep, policy: DecodePolicy) -> torch.Tensor:
        """Zeros ``[B, Hkv, N]`` (a broadcast view, no memory)."""
        key = step.key
        return torch.zeros(1, 1, 1, device=key.device).expand(key.shape[0], key.shape[1], key.shape[2])
