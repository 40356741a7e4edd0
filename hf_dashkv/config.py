"""DashKVConfig: every knob of DASH-KV in one validated dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

GROUP_REDUCTIONS = ("sum", "min")
SELECTORS = ("hash", "oracle", "quest", "streaming")


@dataclass
class DashKVConfig:
    """What DASH-KV hashes and how much of the context it attends to exactly.

    Args:
        bits: code length per token and KV head; a multiple of 8 (codes are stored packed, ``bits // 8`` bytes).
        budget: tokens picked by Hamming distance per KV head at each decode step, on top of the sinks and
            the recent window. An ``int`` is a token count; a ``float`` in (0, 1) is a fraction of the context.
        sink_tokens: the first tokens of each sequence (after any left padding), always attended exactly.
        recent_tokens: the most recent tokens (the current one included), always attended exactly.
        dense_layers: model layer indices that always run full attention (the "sandwich"); negative indices
            count from the end, as in Python.
        query_hidden: width of the query encoder's MLP; 0 makes the query encoder a single linear map.
        group_reduce: how the query heads of one GQA group combine their Hamming distances into the one
            selection they share: ``"sum"`` (mean distance) or ``"min"`` (closest to any head).
        selector: what picks the budget's tokens: ``"hash"`` (DASH-KV), or a baseline through the same cache and
            attention path (``hf_dashkv.selectors``): ``"oracle"`` (exact scores, the ceiling), ``"quest"``
            (per-page key bounds), ``"streaming"`` (no budget: sinks + recent window only).
        page_size: tokens per page for ``"quest"``.
        tier2_budget: tokens (an ``int``, or a ``float`` fraction of the context, as for ``budget``) that get the
            approximate tier-2 logit of DASH-KV's mixed precision: the next nearest after the budget, attended with
            a logit fitted from the codes (``hf_dashkv.selectors.tiers``) and their exact values. 0 (default): off.
        spatial_calibration: discount the distance of keys that many query heads of the layer rank among their
            nearest (``hf_dashkv.selectors.calibrated``). Off by default.
        temporal_calibration: discount the distance of keys the previous hashed layer selected at the same step.
            Off by default. The learned terms need fitted encoders (``lightning_modules.calibration``) and the
            ``"hash"`` selector; with them on, decode steps take the PyTorch path, not the fused CPU kernel.
        rerank: ``> 1`` re-ranks: the hash codes shortlist ``rerank x budget`` candidates and exact scores choose the
            budget among them (``selectors.rerank``), for ``rerank x budget`` more key reads per step; 1: off.
    """

    bits: int = 64
    budget: int | float = 256
    sink_tokens: int = 4
    recent_tokens: int = 64
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    query_hidden: int = 256
    group_reduce: str = "sum"
    selector: str = "hash"
    page_size: int = 16
    tier2_budget: int | float = 0
    spatial_calibration: bool = False
    temporal_calibration: bool = False
    rerank: int = 1

    def __post_init__(self) -> None:
        # JSON (Hub configs, YAML recipes) gives lists; keep one hashable, comparable form.
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        if not isinstance(self.bits, int) or self.bits <= 0 or self.bits % 8:
            raise ValueError(f"DashKVConfig.bits={self.bits!r}: must be a positive multiple of 8 (e.g. 32, 64, 128).")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"DashKVConfig.budget={self.budget!r}: give an int (tokens) or a float in (0, 1) (fraction).")
        if isinstance(self.budget, float) and not 0.0 < self.budget < 1.0:
            raise ValueError(
                f"DashKVConfig.budget={self.budget!r}: a float budget is a fraction of the context and must lie in "
                "(0, 1); use an int for a token count."
            )
        if isinstance(self.budget, int) and self.budget <= 0:
            raise ValueError(f"DashKVConfig.budget={self.budget!r}: must be > 0 tokens.")
        for name in ("sink_tokens", "recent_tokens", "query_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"DashKVConfig.{name}={value!r}: must be an int >= 0.")
        if self.recent_tokens < 1:
            raise ValueError(
                "DashKVConfig.recent_tokens=0: the current token must always attend to itself; use recent_tokens >= 1."
            )
        if self.selector not in SELECTORS:
            raise ValueError(f"DashKVConfig.selector={self.selector!r}: choose one of {SELECTORS}.")
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"DashKVConfig.page_size={self.page_size!r}: must be an int >= 1.")
        if self.group_reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"DashKVConfig.group_reduce={self.group_reduce!r}: choose one of {GROUP_REDUCTIONS}.")
        tier2 = self.tier2_budget
        if isinstance(tier2, bool) or not isinstance(tier2, (int, float)) or tier2 < 0 or (
            isinstance(tier2, float) and not 0.0 < tier2 < 1.0
        ):
            raise ValueError(
                f"DashKVConfig.tier2_budget={tier2!r}: give an int >= 0 (tokens; 0 is off) or a float in (0, 1) "
                "(fraction of the context)."
            )
        for name in ("spatial_calibration", "temporal_calibration"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DashKVConfig.{name}={getattr(self, name)!r}: must be True or False.")
        if not isinstance(self.rerank, int) or isinstance(self.rerank, bool) or self.rerank < 1:
            raise ValueError(f"DashKVConfig.rerank={self.rerank!r}: must be an int >= 1 (1: no re-ranking).")
        if self.rerank > 1 and (self.selector != "hash" or self.learned_terms):
            raise ValueError(
                f"DashKVConfig.rerank={self.rerank} re-ranks what hash codes shortlist: use it with selector='hash' "
                "and without tier2_budget / calibration, or set rerank=1."
            )
        if self.learned_terms and self.selector != "hash":
            raise ValueError(
                f"DashKVConfig: tier2_budget, spatial_calibration and temporal_calibration work on hash codes, but "
                f"selector={self.selector!r}; use selector='hash' or turn them off."
            )

    @property
    def code_bytes(self) -> int:
        """Bytes of one packed code (per token per KV head)."""
        return self.bits // 8

    def budget_tokens(self, context_length: int) -> int:
        """The budget in tokens for a context of ``context_length`` tokens (none for the streaming baseline)."""
        if self.selector == "streaming":
            return 0
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * context_length))
        return self.budget

    def tier2_tokens(self, context_length: int) -> int:
        """How many tokens get the approximate tier-2 logit at a decode step (0: tier 2 is off)."""
        if isinstance(self.tier2_budget, float):
            return max(1, math.ceil(self.tier2_budget * context_length))
        return self.tier2_budget

    @property
    def calibrated(self) -> bool:
        """Whether distances get a spatial or temporal discount before selection."""
        return self.spatial_calibration or self.temporal_calibration

    @property
    def learned_terms(self) -> bool:
        """Whether any optional learned term (tier 2, calibration) is on; the fused CPU kernel has none of them."""
        return self.calibrated or self.tier2_budget != 0

    def exact_tokens(self, context_length: int) -> int:
        """How many tokens get exact attention at a decode step (sinks + recent + budget)."""
        return self.sink_tokens + self.recent_tokens + self.budget_tokens(context_length)

    def resolve_dense_layers(self, num_layers: int) -> tuple[int, ...]:
        """``dense_layers`` as sorted non-negative indices; raises if one is outside ``[-num_layers, num_layers)``."""
        bad = [i for i in self.dense_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"DashKVConfig.dense_layers has {bad}, outside this model's {num_layers} layers; "
                f"use indices in [0, {num_layers - 1}] (or negative ones counting from the end)."
            )
        return tuple(sorted({i % num_layers for i in self.dense_layers}))

    def to_dict(self) -> dict:
        return asdict(self)
