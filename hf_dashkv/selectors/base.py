"""What every selector shares: a selector turns one decode step and the decode policy into a plan
(``hf_dashkv.plans``): the slots, and how the candidates are ranked. How the plan runs is the backend's business
(``hf_dashkv.backends``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plans import Plan, ScorePlan
from ..policy import DecodePolicy
from ..step import DecodeStep


@dataclass
class Selector:
    """A rule for the budget's tokens. Subclasses give :meth:`scores` (one per cached token and KV head, lower is
    nearer) or a :meth:`plan` of their own; their own parameters are their dataclass fields (``page_size``)."""

    def plan_type(self, policy: DecodePolicy) -> type[Plan]:
        """The type of plan :meth:`plan` makes under ``policy``: what the layer's backend is chosen for, once."""
        return ScorePlan

    def budget(self, policy: DecodePolicy, n: int) -> int:
        """Candidates chosen at a step over ``n`` cached tokens."""
        return policy.budget_tokens(n)

    def covers(self, policy: DecodePolicy, n: int) -> bool:
        """Whether the exact rows cover a context of ``n`` tokens, so that plain attention is exact and cheaper."""
        return policy.sink_tokens + policy.recent_tokens + self.budget(policy, n) >= n

    def check(self, policy: DecodePolicy) -> None:
        """Raise ``ValueError`` if ``policy`` asks for what this selector cannot do (re-ranking, learned terms: they
        act on hash codes)."""
        if policy.rerank > 1 or policy.learned_terms:
            raise ValueError(
                f"{type(self).__name__} has no hash codes, but the policy asks for re-ranking or learned terms "
                f"(rerank={policy.rerank}, tier2_budget={policy.tier2_budget}, spatial_calibration="
                f"{policy.spatial_calibration}, temporal_calibration={policy.temporal_calibration}); use "
                "dataclasses.replace(policy, rerank=1, tier2_budget=0, spatial_calibration=False, "
                "temporal_calibration=False)."
            )

    def scores(self, step: DecodeStep, policy: DecodePolicy) -> torch.Tensor:
        """``[B, Hkv, N]``, lower is nearer."""
        raise NotImplementedError

    def plan(self, step: DecodeStep, policy: DecodePolicy) -> Plan:
        """What this step attends to: the policy's slots, candidates ranked by :meth:`scores`."""
        return ScorePlan(policy.sink_tokens, policy.recent_tokens, self.budget(policy, step.n),
                         self.scores(step, policy))
