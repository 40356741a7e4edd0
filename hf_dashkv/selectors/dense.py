"""Full attention: nothing is selected, every step attends to every cached token (the reference for every method)."""

from __future__ import annotations

from dataclasses import dataclass

from ..policy import DecodePolicy
from .base import Selector


@dataclass
class DenseSelector(Selector):
    """Every layer dense: plain SDPA at every step, whatever the policy's budget."""

    def covers(self, policy: DecodePolicy, n: int) -> bool:
        return True

    def check(self, policy: DecodePolicy) -> None:
        pass  # nothing is selected, so no field of the policy applies (a DASH-KV policy serves as the reference's)
