"""The decode step as the attention function hands it on: one query step of one layer, and the per-cache record
that one forward pass carries from layer to layer."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .selection import candidates, first_position


@dataclass
class DecodeRecord:
    """State one decode step passes from layer to layer, held by one cache (never by a module).

    ``previous``: the last hashed layer's selection at this step, ``(layer_idx, N, bool [B, N])`` (temporal
    calibration reads it). ``observers``: callables ``(step, selection)`` told of every selection (recall
    measurement, ``hf_dashkv.recall``; temporal calibration's memory). ``pending``: a sparse layer whose stored
    keys no attention call has taken yet (to notice a model whose attention does not read the cache).
    """

    previous: tuple[int, int, torch.Tensor] | None = None
    observers: list = field(default_factory=list)
    warned: set = field(default_factory=set)
    pending: object | None = None

    def warn_once(self, message: str) -> None:
        """Warn about this cache's use once, however many layers and steps find the problem."""
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(message, stacklevel=4)


@dataclass
class DecodeStep:
    """One query step of one layer, as the attention function receives it.

    ``query [B, Hq, 1, D]``; ``key``/``value [B, Hkv, N, D]`` (views of the cache); ``key_codes [B, Hkv, N, nbytes]``
    or ``None`` (no hashing); ``valid`` bool ``[B, N]`` or ``None`` (no padding); ``scale``: the attention scaling;
    ``layer_idx``: the model layer; ``record``: the cache's :class:`DecodeRecord`; ``left_padded``: whether the
    padding is left padding only, as the layer checked it once for the prompt (``None``: not checked).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_codes: torch.Tensor | None
    valid: torch.Tensor | None
    scale: float
    layer_idx: int
    record: DecodeRecord = field(default_factory=DecodeRecord)
    left_padded: bool | None = None

    @property
    def n(self) -> int:
        return self.key.shape[2]

    @property
    def ends(self) -> torch.Tensor:
        """``[1]``: one query whose context is the whole cache (made on the device: no copy, no sync)."""
        return torch.full((1,), self.n, device=self.key.device)

    @cached_property
    def first(self) -> torch.Tensor:
        """``[B]``, each sequence's first real position (``selection.first_position``)."""
        return first_position(self.valid, self.key.shape[0], self.key.device)

    def candidates(self, sinks: int, recent: int) -> torch.Tensor:
        """bool ``[B, N]``: the keys a budget chooses from at this step, between ``sinks`` and the ``recent`` window
        (``selection.candidates``)."""
        return candidates(sinks, recent, self.first, self.ends, self.n, self.valid)[:, 0]
