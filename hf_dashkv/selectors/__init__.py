"""Selectors: what a decode step attends to. One method per file, each a small dataclass of its own parameters.

A selector turns a step and the decode policy into a plan (``hf_dashkv.plans``): the sinks, the recent window and a
budget of candidates ranked by its scores; the layer's backend runs the plan (``hf_dashkv.backends``). So DASH-KV
and its baselines share the cache, the selection rule and the attention, and a comparison between them differs only
in the ranking. The random-projection baseline (SimHash) is the hash selector with ``HashEncoders.random`` encoders.
DASH-KV's optional learned terms are selectors around the hash codes: :class:`CalibratedSelector` (distance
discounts) and :class:`Tier2Selector` (approximate logits for the next nearest keys); re-ranking is a plan of the
hash selector (``plans.RerankPlan``). Baselines: :class:`OracleSelector` (exact scores, the ceiling),
:class:`QuestSelector` (page bounds), :class:`StreamingSelector` (sinks + recent window), :class:`DenseSelector`
(full attention).
"""

from __future__ import annotations

from ..encoders import LayerEncoders
from ..policy import DecodePolicy
from .base import Selector
from .calibrated import CalibratedSelector
from .dense import DenseSelector
from .hash import HashSelector
from .oracle import OracleSelector
from .quest import QuestSelector
from .streaming import StreamingSelector
from .tiers import Tier2Selector


def hash_selector(policy: DecodePolicy, encoders: LayerEncoders) -> Selector:
    """The selector DASH-KV runs on one layer under ``policy`` (its optional terms on or off)."""
    selector = (CalibratedSelector if policy.calibrated else HashSelector)(encoders)
    return Tier2Selector(selector) if policy.tier2_budget else selector


__all__ = [
    "CalibratedSelector", "DenseSelector", "HashSelector", "OracleSelector", "QuestSelector", "Selector",
    "StreamingSelector", "Tier2Selector", "hash_selector",
]
