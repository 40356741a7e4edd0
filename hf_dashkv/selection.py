"""Which cached rows a query attends to exactly: sinks + recent window + the budget nearest by a selector's score.

This module is the one definition of that rule, for one decode step and for many positions at once (training,
recall measurement, calibration fitting): every caller passes a selector's scores to :func:`select`. Every
token stays in the cache; what is not selected is skipped for this step only. The query heads of a GQA group
share one selection per KV head (:func:`combine_group`), so each selected row is read once per KV head.

A query at position ``p`` sees ``p + 1`` tokens (its context): the sinks are the first ``sink_tokens`` real
tokens (after any left padding), the recent window the last ``recent_tokens`` (``p`` itself included), and the
candidates everything between them; ``DecodePolicy.budget_tokens(p + 1)`` of the candidates are chosen by score.
The slots of a selection are laid out once, here (:func:`fixed_rows`, then the chosen candidates); the compiled
backends (``hf_dashkv.backends``) fill the same slots and are tested equal to this definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codes import nearest
from .policy import DecodePolicy


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
    sinks: int, recent: int, first: torch.Tensor, ends: torch.Tensor, n: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """bool ``[B, P, N]``: the keys the budget may choose from, after the sinks and before the recent window.

    Args:
        sinks, recent: the policy's sink and recent-window tokens; first: ``[B]`` from :func:`first_position`;
        ends: ``[P]``, each query's context length (position + 1); n: cached tokens; valid: bool ``[B, N]`` or ``None``.
    """
    keys = torch.arange(n, device=first.device)
    after_sinks = keys >= (first + sinks).view(-1, 1, 1)  # [B, 1, N]
    before_recent = keys < (ends - recent).view(1, -1, 1)  # [1, P, N]
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
    policy: DecodePolicy,
    ends: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> Selection:
    """The rows each query position attends to exactly: the definition of DASH-KV's selection.

    Args:
        scores: ``[B, Hkv, P, N]``, one per KV head (:func:`combine_group`), lower is nearer; integer scores
            break ties towards the later position.
        policy: sinks, recent window and budget (``budget_tokens`` of each query's context).
        ends: ``[P]``, each query's context length.
        valid: bool ``[B, N]``, ``False`` at padding, or ``None`` when every key is visible.

    Returns:
        A :class:`Selection` of ``[B, Hkv, P, sinks + recent + max budget]``; queries with a smaller budget have
        their extra slots unused.
    """
    budgets = [policy.budget_tokens(int(end)) for end in ends.tolist()]
    return select_rows(scores, policy.sink_tokens, policy.recent_tokens, budgets, ends.to(scores.device), valid)


def select_rows(
    scores: torch.Tensor, sinks: int, recent: int, budgets: list[int], ends: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> Selection:
    """:func:`select` with the budget of each position given in tokens (``budgets``, ``[P]`` ints); reads nothing
    back from the device."""
    batch, kv_heads, length, n = scores.shape
    device = scores.device
    first = first_position(valid, batch, device)
    fixed, fixed_ok = fixed_rows(sinks, recent, first, ends, n, valid)

    allowed = candidates(sinks, recent, first, ends, n, valid).unsqueeze(1).expand(-1, kv_heads, -1, -1)
    width = max(budgets)
    near_rows = torch.zeros(batch, kv_heads, length, width, dtype=torch.long, device=device)
    near_ok = torch.zeros(batch, kv_heads, length, width, dtype=torch.bool, device=device)
    for budget in sorted(set(budgets)):  # a fractional budget grows with the context
        if budget == 0:
            continue
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

    This is the one layout of those slots; every backend fills the slots after them with the chosen candidates.

    Args: first ``[B]`` (:func:`first_position`); ends ``[P]``, each query's context length; valid as in
    :func:`select` (``None``: the keys from ``first`` on are real, those before it left padding).
    """
    device = first.device
    batch, length = first.shape[0], ends.shape[0]
    sink_rows = (first.view(-1, 1, 1) + torch.arange(sinks, device=device)).expand(-1, length, -1)  # [B, P, S]
    sink_ok = sink_rows < (ends - recent).view(1, -1, 1)
    recent_rows = (ends.view(1, -1, 1) - recent + torch.arange(recent, device=device)).expand(batch, -1, -1)
    if valid is None:
        recent_ok = recent_rows >= first.view(-1, 1, 1)
    else:
        sink_ok = sink_ok & valid.gather(1, sink_rows.clamp(max=n - 1).flatten(1)).view_as(sink_rows)
        recent_ok = (recent_rows >= 0) & valid.gather(1, recent_rows.clamp(min=0).flatten(1)).view_as(recent_rows)
    rows = torch.cat([sink_rows.clamp(max=n - 1), recent_rows.clamp(min=0)], dim=-1)
    return rows, torch.cat([sink_ok, recent_ok], dim=-1)


def select_step(scores: torch.Tensor, sinks: int, recent: int, budget: int,
                valid: torch.Tensor | None = None) -> Selection:
    """:func:`select_rows` for one decode step over the whole cache: ``scores [B, Hkv, N]`` -> ``[B, Hkv, M]``."""
    n = scores.shape[-1]
    ends = torch.full((1,), n, device=scores.device)  # made on the device: no copy, no sync
    chosen = select_rows(scores.unsqueeze(2), sinks, recent, [budget], ends, valid)
    return Selection(chosen.rows.squeeze(2), chosen.valid.squeeze(2))
