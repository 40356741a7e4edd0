"""Selectors: what picks the budget's tokens at a decode step. One method per file, one mechanism for all.

Each selector is a small dataclass with one scoring method (lower is nearer); ``hf_dashkv.selection.select``
adds the sinks and the recent window and takes the ``budget`` nearest, and ``hf_dashkv.exact`` runs exact
attention over them. So DASH-KV and its baselines share the cache, the selection rule and the attention, and a
comparison between them differs only in the scores. The random-projection baseline (SimHash) is the hash
selector with ``HashEncoders.random`` encoders. DASH-KV's optional learned terms wrap the hash selector:
:class:`CalibratedSelector` (distance discounts) and :class:`Tier2Selector` (approximate logits for the next
nearest keys); :class:`RerankSelector` re-ranks the hash selector's shortlist by exact scores.
"""

from __future__ import annotations

from ..config import DashKVConfig
from ..encoders import LayerEncoders
from .base import DecodeRecord, DecodeStep, Selector
from .calibrated import CalibratedSelector
from .hash import HashSelector
from .oracle import OracleSelector
from .quest import QuestSelector
from .rerank import RerankSelector
from .streaming import StreamingSelector
from .tiers import Tier2Selector

_BASELINES = {"oracle": OracleSelector, "quest": QuestSelector, "streaming": StreamingSelector}


def needs_encoders(config: DashKVConfig) -> bool:
    """Whether the configured selector hashes (and so needs HashEncoders)."""
    return config.selector == "hash"


def build_selector(config: DashKVConfig, encoders: LayerEncoders | None) -> Selector:
    """The selector ``config`` asks for, for one layer (``encoders``: that layer's, when it hashes)."""
    if not needs_encoders(config):
        return _BASELINES[config.selector](config)
    selector = (CalibratedSelector if config.calibrated else HashSelector)(config, encoders)
    if config.rerank > 1:
        return RerankSelector(config, selector)
    return Tier2Selector(config, selector) if config.tier2_budget else selector


__all__ = [
    "CalibratedSelector", "DecodeRecord", "DecodeStep", "HashSelector", "OracleSelector", "QuestSelector",
    "RerankSelector", "Selector",
    "StreamingSelector", "Tier2Selector", "build_selector", "needs_encoders",
]
