"""What every selector shares: the decode step it reads, the per-cache record it may leave, and the flow
scores -> :func:`hf_dashkv.selection.select` -> exact attention over the selected rows."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..config import DashKVConfig
from ..exact import attend_rows
from ..selection import Selection, candidates, first_position, left_padded, select_step


@dataclass
class DecodeRecord:
    """State one decode step passes from layer to layer, held by one cache (never by a module).

    ``previous``: the last hashed layer's selection at this step, ``(layer_idx, N, bool [B, N])`` (temporal
    calibration reads it). ``observers``: callables ``(step, selection)`` told of every selection (recall
    measurement, ``hf_dashkv.recall``).
    """

    previous: tuple[int, int, torch.Tensor] | None = None
    observers: list = field(default_factory=list)
    warned: set = field(default_factory=set)

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
    ``layer_idx``: the model layer; ``record``: the cache's :class:`DecodeRecord`.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_codes: torch.Tensor | None
    valid: torch.Tensor | None
    scale: float
    layer_idx: int
    record: DecodeRecord = field(default_factory=DecodeRecord)

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

    def left_padded(self) -> bool:
        """Whether the padding is left padding only (``selection.left_padded``; reads back from the device)."""
        return left_padded(self.valid, self.first)

    def candidates(self, config: DashKVConfig) -> torch.Tensor:
        """bool ``[B, N]``: the keys this step's budget chooses from (``selection.candidates``)."""
        return candidates(config, self.first, self.ends, self.n, self.valid)[:, 0]


@dataclass
class Selector:
    """A rule for the budget's tokens: one score per cached token and KV head (lower is nearer).

    Subclasses give :meth:`scores`; :meth:`select` applies the one selection rule to them, and :meth:`decode`
    attends exactly over the result. ``config`` is the decode policy (budget, sinks, recent window, ...).
    """

    config: DashKVConfig

    def scores(self, step: DecodeStep) -> torch.Tensor:
        """``[B, Hkv, N]``, lower is nearer."""
        raise NotImplementedError

    def covers(self, n: int) -> bool:
        """Whether the exact rows cover a context of ``n`` tokens, so that plain attention is exact and cheaper."""
        return self.config.exact_tokens(n) >= n

    def select(self, step: DecodeStep, scores: torch.Tensor | None = None) -> Selection:
        """The step's :class:`Selection`, ``[B, Hkv, M]``, by ``scores`` (default: :meth:`scores`)."""
        return select_step(self.scores(step) if scores is None else scores, self.config, step.valid)

    def decode(self, step: DecodeStep) -> tuple[torch.Tensor, Selection]:
        """The step's attention output ``[B, 1, Hq, D]`` and its selection."""
        selection = self.select(step)
        return attend_rows(step.query, step.key, step.value, selection, step.scale), selection
