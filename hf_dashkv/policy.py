"""DecodePolicy: what a user changes at inference, apart from what training fixed (``EncoderConfig``).

Encoders may ship a *recommended* policy, a file of its own beside their weights (``decode_policy.json``, read by
``HashEncoders.from_pretrained`` into ``encoders.policy``); ``dataclasses.replace`` on it is how a user changes one
knob, e.g. ``replace(encoders.policy, rerank=1)`` turns re-ranking off.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

GROUP_REDUCTIONS = ("sum", "min")
POLICY_NAME = "decode_policy.json"


@dataclass(frozen=True)
class DecodePolicy:
    """How much of the context a decode step attends to exactly, and how the rows are chosen.

    Args:
        budget: tokens picked per KV head at each decode step, on top of the sinks and the recent window. An ``int``
            is a token count; a ``float`` in (0, 1) is a fraction of the context.
        sink_tokens: the first tokens of each sequence (after any left padding), always attended exactly.
        recent_tokens: the most recent tokens (the current one included), always attended exactly.
        dense_layers: model layers that run full attention (the "sandwich"), on top of the layers the encoders
            have no weights for (always dense); negative indices count from the end, as in Python.
        group_reduce: how the query heads of one GQA group combine their distances into the one selection they
            share: ``"sum"`` (mean distance) or ``"min"`` (closest to any head).
        rerank: ``> 1`` re-ranks: the hash codes shortlist ``rerank x budget`` candidates and exact scores choose the
            budget among them (``plans.RerankPlan``), for ``rerank x budget`` more key reads per step; 1: off.
        tier2_budget: tokens (an ``int``, or a ``float`` fraction as for ``budget``) that get the approximate tier-2
            logit of DASH-KV's mixed precision (``selectors.tiers``); 0: off. Needs fitted terms.
        spatial_calibration: discount the distance of keys that many query heads of the layer rank among their
            nearest (``selectors.calibrated``). Needs fitted terms.
        temporal_calibration: discount the distance of keys the previous hashed layer selected at the same step.
            Needs fitted terms.
    """

    budget: int | float = 256
    sink_tokens: int = 4
    recent_tokens: int = 64
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    group_reduce: str = "sum"
    rerank: int = 1
    tier2_budget: int | float = 0
    spatial_calibration: bool = False
    temporal_calibration: bool = False

    def __post_init__(self) -> None:
        # JSON (Hub files, YAML recipes) gives lists; keep one hashable, comparable form
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        _check_tokens("budget", self.budget, allow_zero=False)
        _check_tokens("tier2_budget", self.tier2_budget, allow_zero=True)
        for name in ("sink_tokens", "recent_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DecodePolicy.{name}={value!r}: must be an int >= 0.")
        if self.recent_tokens < 1:
            raise ValueError(
                "DecodePolicy.recent_tokens=0: the current token must always attend to itself; use recent_tokens >= 1."
            )
        if self.group_reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"DecodePolicy.group_reduce={self.group_reduce!r}: choose one of {GROUP_REDUCTIONS}.")
        for name in ("spatial_calibration", "temporal_calibration"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DecodePolicy.{name}={getattr(self, name)!r}: must be True or False.")
        if not isinstance(self.rerank, int) or isinstance(self.rerank, bool) or self.rerank < 1:
            raise ValueError(f"DecodePolicy.rerank={self.rerank!r}: must be an int >= 1 (1: no re-ranking).")
        if self.rerank > 1 and self.learned_terms:
            raise ValueError(
                f"DecodePolicy.rerank={self.rerank} re-ranks what the hash codes shortlist, which tier2_budget and "
                "calibration change: turn those off, or set rerank=1."
            )

    def budget_tokens(self, context_length: int) -> int:
        """The budget in tokens for a context of ``context_length`` tokens."""
        return _tokens(self.budget, context_length)

    def tier2_tokens(self, context_length: int) -> int:
        """How many tokens get the approximate tier-2 logit at a decode step (0: tier 2 is off)."""
        return _tokens(self.tier2_budget, context_length)

    @property
    def calibrated(self) -> bool:
        """Whether distances get a spatial or temporal discount before selection."""
        return self.spatial_calibration or self.temporal_calibration

    @property
    def learned_terms(self) -> bool:
        """Whether any optional learned term (tier 2, calibration) is on: they need fitted encoders."""
        return self.calibrated or self.tier2_budget != 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "the policy") -> "DecodePolicy":
        """A policy from a JSON object; unknown fields are an error that names them (a typo is never ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source} has unknown decode-policy fields {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/decode_policy.json`` (a recommended policy shipped beside encoders)."""
        path = Path(folder) / POLICY_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DecodePolicy":
        """Read a ``decode_policy.json``."""
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))


def _check_tokens(name: str, value, allow_zero: bool) -> None:
    low = "an int >= 0 (tokens; 0 is off)" if allow_zero else "an int >= 1 (tokens)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"DecodePolicy.{name}={value!r}: give {low} or a float in (0, 1) (fraction of the context).")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError(
            f"DecodePolicy.{name}={value!r}: a float is a fraction of the context and must lie in (0, 1); use an "
            "int for a token count."
        )
    if isinstance(value, int) and value < (0 if allow_zero else 1):
        raise ValueError(f"DecodePolicy.{name}={value!r}: give {low}.")


def _tokens(amount: int | float, context_length: int) -> int:
    if isinstance(amount, float):
        return max(1, math.ceil(amount * context_length))
    return amount
