"""Plans: what one decode step of one layer attends to, as a selector decides it; backends decide how to run it.

A plan fixes the slots (``sinks`` first tokens, the ``recent`` window, ``budget`` candidates; ``selection.py`` lays
them out) and how the candidates are ranked. Each plan's :meth:`Plan.attend` is its definition in PyTorch, which
``backends.TorchBackend`` runs on any device; the compiled backends run the plan types they name, and are tested
equal to these definitions.

- :class:`ScorePlan`: rank by given scores (the baselines, calibrated distances);
- :class:`CodePlan`: rank by Hamming distance of the query's codes to the cached key codes (DASH-KV);
- :class:`RerankPlan`: the codes shortlist ``shortlist`` candidates, exact scores keep the budget among them;
- ``selectors.tiers.TieredPlan``: DASH-KV's mixed precision, a tier of approximate logits beside the exact rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codes import head_distances, nearest
from .exact import attend_rows, gather_rows
from .policy import DecodePolicy
from .selection import Selection, candidates, combine_group, first_position, select_step


@dataclass(frozen=True)
class Plan:
    """The slots of one step: the first ``sinks`` real tokens, the last ``recent`` and ``budget`` candidates."""

    sinks: int
    recent: int
    budget: int

    def rank(self, step) -> torch.Tensor:
        """``[B, Hkv, N]``, lower is nearer: how the candidates are ranked."""
        raise NotImplementedError

    def select(self, step) -> Selection:
        """The step's :class:`Selection`, ``[B, Hkv, M]``, by :meth:`rank`."""
        return select_step(self.rank(step), self.sinks, self.recent, self.budget, step.valid)

    def attend(self, step) -> tuple[torch.Tensor, Selection]:
        """The definition: the output ``[B, 1, Hq, D]`` of exact attention over the selection, and the selection."""
        selection = self.select(step)
        return attend_rows(step.query, step.key, step.value, selection, step.scale), selection

    def candidates(self, step) -> torch.Tensor:
        """bool ``[B, N]``: the keys this step's budget chooses from (``selection.candidates``)."""
        return step.candidates(self.sinks, self.recent)


@dataclass(frozen=True)
class ScorePlan(Plan):
    """Rank by ``scores`` ``[B, Hkv, N]`` (lower is nearer)."""

    scores: torch.Tensor

    def rank(self, step) -> torch.Tensor:
        return self.scores


@dataclass(frozen=True)
class CodePlan(Plan):
    """Rank by Hamming distance: ``query_codes [B, Hkv, G, nbytes]`` against the cached key codes, the group's
    distances combined by ``group_reduce`` (``"sum"`` or ``"min"``)."""

    query_codes: torch.Tensor
    group_reduce: str

    def rank(self, step) -> torch.Tensor:
        return combine_group(head_distances(self.query_codes, step.key_codes), self.group_reduce)


@dataclass(frozen=True)
class RerankPlan(CodePlan):
    """:class:`CodePlan`'s distances shortlist ``shortlist`` candidates; each shortlisted key is then ranked by minus
    the group's summed softmax of its exact logits over the shortlist (the oracle's score on what the codes found)."""

    shortlist: int

    def rank(self, step) -> torch.Tensor:
        distances = super().rank(step)
        rows, ok = nearest(distances, self.candidates(step).unsqueeze(1).expand_as(distances), self.shortlist)
        return shortlist_scores(step.query, step.key, rows.unsqueeze(2), ok.unsqueeze(2), step.scale, step.n)[:, :, 0]


def shortlist_scores(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, ok: torch.Tensor, scale: float,
                     n: int) -> torch.Tensor:
    """Minus the group's summed softmax over each shortlist, float ``[B, Hkv, P, N]`` (``+inf`` off the shortlist).

    Args:
        query: ``[B, Hq, P, D]``; key: ``[B, Hkv, N, D]``; rows, ok: the shortlist ``[B, Hkv, P, S]`` and which of
        its slots are in use; scale: the attention scaling; n: cached tokens.
    """
    kv_heads = key.shape[1]
    keys = gather_rows(key, rows.flatten(2)).unflatten(2, rows.shape[2:])  # [B, Hkv, P, S, D]
    q = query.unflatten(1, (kv_heads, -1)).float()  # [B, Hkv, G, P, D]
    logits = torch.einsum("bkgpd,bkpsd->bkgps", q, keys.float()) * scale
    probs = logits.masked_fill(~ok.unsqueeze(2), float("-inf")).softmax(-1).nan_to_num(0.0)
    score = torch.where(ok, -probs.sum(2), float("inf"))
    out = torch.full((*rows.shape[:3], n), float("inf"), device=rows.device)
    return out.scatter_reduce(-1, rows, score, "amin")  # unused slots point at position 0 too: the real score wins


def rerank_scores(query: torch.Tensor, key: torch.Tensor, distances: torch.Tensor, policy: DecodePolicy,
                  ends: torch.Tensor, valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:class:`RerankPlan`'s ranking for many query positions at once (measurement): float ``[B, Hkv, P, N]``, lower
    is nearer, ``+inf`` off each position's shortlist of ``policy.rerank x budget``.

    Args:
        query: ``[B, Hq, P, D]``; key: ``[B, Hkv, N, D]``; distances: Hamming ``[B, Hkv, P, N]``;
        policy: sinks, recent window, budget and ``rerank``; ends: ``[P]``, each query's context length;
        valid: bool ``[B, N]`` or ``None``; scale: the attention scaling.
    """
    batch, kv_heads, length, n = distances.shape
    first = first_position(valid, batch, distances.device)
    allowed = candidates(policy.sink_tokens, policy.recent_tokens, first, ends, n, valid)
    allowed = allowed.unsqueeze(1).expand_as(distances)
    out = torch.full(distances.shape, float("inf"), device=distances.device)
    shortlists = [policy.rerank * policy.budget_tokens(int(end)) for end in ends.tolist()]
    for size in sorted(set(shortlists)):  # a fractional budget grows with the context
        index = torch.tensor([i for i, s in enumerate(shortlists) if s == size], device=distances.device)
        rows, ok = nearest(distances[:, :, index], allowed[:, :, index], size)  # [B, Hkv, p, size]
        out[:, :, index] = shortlist_scores(query[:, :, index], key, rows, ok, scale, n)
    return out
