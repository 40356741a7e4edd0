"""EncoderConfig: what training fixed about a set of hash encoders (saved beside their weights).

What a user changes at inference (budget, sinks, recent window, group rule, re-ranking, dense layers, optional
terms) is the decode policy, :class:`hf_dashkv.policy.DecodePolicy`; which layers have encoders is the model
layout saved with them (:class:`hf_dashkv.layout.ModelLayout`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EncoderConfig:
    """The shape of the hash encoders; training fixes it, so a decode policy cannot change it.

    Args:
        bits: code length per token and KV head; a multiple of 8 (codes are stored packed, ``bits // 8`` bytes).
        query_hidden: width of the query encoder's MLP; 0 makes the query encoder a single linear map.
    """

    bits: int = 64
    query_hidden: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits <= 0 or self.bits % 8:
            raise ValueError(f"EncoderConfig.bits={self.bits!r}: must be a positive multiple of 8 (e.g. 32, 64, 128).")
        if not isinstance(self.query_hidden, int) or isinstance(self.query_hidden, bool) or self.query_hidden < 0:
            raise ValueError(f"EncoderConfig.query_hidden={self.query_hidden!r}: must be an int >= 0 (0: linear).")

    @property
    def code_bytes(self) -> int:
        """Bytes of one packed code (per token per KV head)."""
        return self.bits // 8

    def to_dict(self) -> dict:
        return asdict(self)
