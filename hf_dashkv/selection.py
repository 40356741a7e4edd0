"""Which cached rows a query attends to exactly: sinks + recent window + the budget nearest by a selector's score.

This module is the one definition of that rule, for one decode step and for many positions at once (training,
recall measurement, calibration fitting): every caller passes a selector's scores to :func:`select`. Every
token stays in the cache; what is not selected is skipped for this step only. The query heads of a GQA group
share one selection per KV head (:func:`combine_group`), so each selected row is read once per KV head.

A query at position ``p`` sees ``p + 1`` tokens (its context): the sinks are the first ``sink_tokens`` real
tokens (after any left padding), the recent window the last ``recent_tokens`` (``p`` itself included), and the
candidates everything between them; ``DashKVConfig.budget_tokens(p + 1)`` of the candidates are chosen by score.
The compiled CPU kernel (``kernels.decode_attention``) is the fast path of the same rule and is tested equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codes import nearest
from .config import DashKVConfig


@dataclass(frozen=True)
class Selection:
    """The rows some queries attend to: ``rows`` (cache positions, int64) and ``valid`` (bool), each ``[..., M]``,
    ``M = sinks + recent + budget`` slots (sinks, then the recent window, then the chosen candidates in ascending
    position). Unused slots (padding, too few candidates, a sink inside the recent window) are ``valid == False``."""

    rows: torch.Tensor
    valid: torch.Tensor

    def mask(self, n: int) -> torch.Tensor:
        """The selected positions as bool ``[..., N]``.

        Counted, not scattered as booleans: unused slots point at real positions too, and a scattered ``False``
        could overwrite a ``True`` for the same position.
        """
        counts = torch.zeros(*self.rows.shape[:-1], n, dtype=torch.int32, device=self.rows.device)
        return counts.scatter_add_(-1, self.rows, self.valid.to(torch.int32)) > 0


def first_position(valid: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """First non-padding position of each sequence ``[B]`` (0 without a mask): sinks start at the first real token.
    Stays on the device."""
    if valid is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return valid.int().argmax(-1)


def left_padded(valid: torch.Tensor | None, first: torch.Tensor) -> bool:
    """Whether padding is left padding only (the valid keys of each row are a suffix, what batched ``generate``
    produces), the case the compiled CPU kernel handles. Reads a bool back from the device."""
    return valid is None or bool((valid.sum(-1) == valid.shape[-1] - first).all())


def candidates(
    config: DashKVConfig, first: torch.Tensor, ends: torch.Tensor, n: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """bool ``[B, P, N]``: the keys the budget may choose from, after the sinks and before the recent window.

    Args:
        config: sinks and recent window; first: ``[B]`` from :func:`first_position`;
        ends: ``[P]``, each query's context length (position + 1); n: cached tokens; valid: bool ``[B, N]`` or ``None``.
    """
    keys = torch.arange(n, device=first.device)
    after_sinks = keys >= (first + config.sink_tokens).view(-1, 1, 1)  # [B, 1, N]
    before_recent = keys < (ends - config.recent_tokens).view(1, -1, 1)  # [1, P, N]
    out = after_sinks & before_recent
    return out if valid is None else out & valid.unsqueeze(1)


def combine_group(scores: torch.Tensor, reduce: str) -> torch.Tensor:
    """One score per KV head from its query heads', ``[..., Hkv, G, N] -> [..., Hkv, N]``, by ``"sum"`` or
    ``"min"`` (integer Hamming distances stay integers)."""
    if reduce == "min":
        return scores.amin(-2)
    return scores.sum(-2, dtype=torch.int32) if not scores.is_floating_point() else scores.sum(-2)


def select(
    scores: torch.Tensor,
    config: DashKVConfig,
    ends: torch.Tensor | int,
    valid: torch.Tensor | None = None,
) -> Selection:
    """The rows each query attends to exactly: the definition of DASH-KV's selection.

    Args:
        scores: ``[B, Hkv, P, N]``, one per KV head (:func:`combine_group`), lower is nearer; integer scores
            break ties towards the later position.
        config: sinks, recent window and budget (``budget_tokens`` of each query's context).
        ends: ``[P]``, each query's context length; an int for one query (a decode step over ``N`` cached tokens:
            ``N``), which reads nothing back from the device.
        valid: bool ``[B, N]``, ``False`` at padding, or ``None`` when every key is visible.

    Returns:
        A :class:`Selection` of ``[B, Hkv, P, sinks + recent + max budget]``; queries with a smaller budget have
        their extra slots unused.
    """
    batch, kv_heads, length, n = scores.shape
    device = scores.device
    first = first_position(valid, batch, device)
    if isinstance(ends, int):
        budgets, ends = [config.budget_tokens(ends)], torch.full((1,), ends, device=device)
    else:
        budgets, ends = [config.budget_tokens(int(end)) for end in ends.tolist()], ends.to(device)
    fixed, fixed_ok = fixed_rows(config.sink_tokens, config.recent_tokens, first, ends, n, valid)

    allowed = candidates(config, first, ends, n, valid).unsqueeze(1).expand(-1, kv_heads, -1, -1)
    width = max(budgets)
    near_rows = torch.zeros(batch, kv_heads, length, width, dtype=torch.long, device=device)
    near_ok = torch.zeros(batch, kv_heads, length, width, dtype=torch.bool, device=device)
    for budget in sorted(set(budgets)):  # a fractional budget grows with the context
        index = torch.tensor([i for i, b in enumerate(budgets) if b == budget], device=device)
        rows, ok = nearest(scores[:, :, index], allowed[:, :, index], budget)
        near_rows[:, :, index, :budget], near_ok[:, :, index, :budget] = rows, ok

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1).expand(-1, kv_heads, -1, -1)

    rows = torch.cat([per_head(fixed), near_rows], dim=-1)
    row_valid = torch.cat([per_head(fixed_ok), near_ok], dim=-1)
    return Selection(rows, row_valid)


def fixed_rows(
    sinks: int, recent: int, first: torch.Tensor, ends: torch.Tensor, n: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows each query attends whatever the scores, its sinks then its recent window: ``(rows, ok)``, each
    ``[B, P, sinks + recent]``; not ok: a sink inside the recent window, padding, a position before 0.

    Args: first ``[B]`` (:func:`first_position`); ends ``[P]``, each query's context length; valid as in :func:`select`.
    """
    device = first.device
    batch, length = first.shape[0], ends.shape[0]
    seen = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid
    sink_rows = (first.view(-1, 1, 1) + torch.arange(sinks, device=device)).expand(-1, length, -1)  # [B, P, S]
    sink_seen = seen.gather(1, sink_rows.clamp(max=n - 1).flatten(1)).view_as(sink_rows)
    sink_ok = (sink_rows < (ends - recent).view(1, -1, 1)) & sink_seen
    recent_rows = (ends.view(1, -1, 1) - recent + torch.arange(recent, device=device)).expand(batch, -1, -1)
    recent_ok = (recent_rows >= 0) & seen.gather(1, recent_rows.clamp(min=0).flatten(1)).view_as(recent_rows)
    rows = torch.cat([sink_rows.clamp(max=n - 1), recent_rows.clamp(min=0)], dim=-1)
    return rows, torch.cat([sink_ok, recent_ok], dim=-1)


def select_step(scores: torch.Tensor, config: DashKVConfig, valid: torch.Tensor | None = None) -> Selection:
    """:func:`select` for one decode step over the whole cache: ``scores [B, Hkv, N]`` -> ``[B, Hkv, M]``."""
    chosen = select(scores.unsqueeze(2), config, scores.shape[-1], valid)
    return Selection(chosen.rows.squeeze(2), chosen.valid.squeeze(2))
