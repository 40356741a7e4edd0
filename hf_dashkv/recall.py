"""How well a selection covers what attention needs: the measures of docs/design.md §4.

- :func:`ranking_recall` (the headline): over the *candidates only* (the keys between the sinks and the recent
  window, which are attended anyway), ``R@k|B``, the share of each query head's true top-k keys inside its KV
  group's selection, and the candidate mass. ``dashkv recall`` (``apps/probe.py``) and training's validation
  report it.
- attention recall: the share of the true softmax mass on everything selected (sinks and recent window
  included), at real decode steps: the model decodes with a DashKVCache and every selection a hashed layer
  makes is handed to an observer on the cache (``DashKVCache.observing``). :func:`selected_mass` is the one
  definition of "mass on the chosen rows", also used by training and by calibration fitting.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

from .cache import DashKVCache
from .compat import with_cache
from .selectors import DecodeStep
from .selection import Selection


def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float, visible: torch.Tensor | None = None):
    """Exact softmax attention of a GQA group's queries, float ``[..., Hkv, G, P, N]``.

    Args:
        query: ``[..., Hq, P, D]``; key: ``[..., Hkv, N, D]``; scale: the attention scaling;
        visible: bool, broadcast to ``[..., Hkv, G, P, N]``, the keys each query may see, or ``None`` for all.
    """
    kv_heads = key.shape[-3]
    q = query.unflatten(-3, (kv_heads, -1)).float()
    scores = torch.einsum("...kgpd,...knd->...kgpn", q, key.float()) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1)


def selected_mass(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Mass of each query head on the chosen keys: ``probs [..., Hkv, G, P, N]``, ``chosen`` bool ``[..., Hkv, P, N]``
    (one selection per KV head) -> ``[..., Hkv, G, P]`` in [0, 1]."""
    return (probs * chosen.unsqueeze(-3)).sum(-1)


def ranking_recall(
    query: torch.Tensor,
    key: torch.Tensor,
    chosen: torch.Tensor,
    candidates: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    ks: tuple[int, ...] = (1, 8, 32),
) -> dict[str, torch.Tensor]:
    """``R@k|B`` and candidate mass of a selection, per query head and position.

    Args:
        query: ``[B, Hq, P, D]`` at ``positions`` (``[P]``); key: ``[B, Hkv, N, D]``; scale: the attention scaling.
        chosen: bool ``[B, Hkv, P, N]``, what each KV group selected (``Selection.mask``).
        candidates: bool ``[B, P, N]`` (``selection.candidates``): only these count, as keys and as selections.
        ks: the ``k`` of ``R@k``; each position needs at least ``max(ks)`` candidates.

    Returns:
        ``{"R@1": ..., "R@8": ..., "mass": ...}``, each float ``[B, Hkv, G, P]``: the share of the query head's
        ``k`` highest-scoring candidates (by ``q . k``) that its group selected, and the share of its full causal
        softmax mass that lies on selected candidates.
    """
    causal = torch.arange(key.shape[2], device=key.device) <= positions.unsqueeze(1)  # [P, N]
    probs = attention_probs(query, key, scale, causal)  # [B, Hkv, G, P, N]
    picked = (chosen & candidates.unsqueeze(1)).unsqueeze(2).expand_as(probs)
    top = probs.masked_fill(~candidates[:, None, None], -1.0).topk(max(ks), dim=-1).indices
    hits = picked.gather(-1, top).float()
    out = {f"R@{k}": hits[..., :k].mean(-1) for k in ks}
    out["mass"] = (probs * picked).sum(-1)
    return out


class RecallMeter:
    """Observes a cache's selections; ``per_layer()`` gives the mean selected mass per hashed layer."""

    def __init__(self):
        self.sums: dict[int, float] = defaultdict(float)
        self.counts: dict[int, int] = defaultdict(int)

    def __call__(self, step: DecodeStep, selection: Selection) -> None:
        visible = None if step.valid is None else step.valid[:, None, None, None, :]
        probs = attention_probs(step.query, step.key, step.scale, visible)  # [B, Hkv, G, 1, N]
        mass = selected_mass(probs, selection.mask(step.n).unsqueeze(2))
        self.sums[step.layer_idx] += float(mass.mean())
        self.counts[step.layer_idx] += 1

    def per_layer(self) -> dict[int, float]:
        return {i: self.sums[i] / self.counts[i] for i in sorted(self.counts)}


@contextmanager
def measuring_recall(cache: DashKVCache):
    """Within the block, every selection ``cache`` makes is measured; yields the :class:`RecallMeter`.

    ``meter.per_layer()`` gives ``{layer_idx: recall}`` averaged over query heads, batch and decode steps so far.
    """
    with cache.observing(RecallMeter()) as meter:
        yield meter


@torch.inference_mode()
def attention_recall(model, input_ids: torch.Tensor, cache: DashKVCache, decode_steps: int = 8) -> dict[int, float]:
    """Mean selected attention mass per hashed layer over ``decode_steps`` greedy steps after ``input_ids``.

    ``model`` must run the "dashkv" attention. Returns ``{layer_idx: recall}``, averaged over query heads, batch
    and steps.
    """
    with measuring_recall(cache) as meter:
        out = model(input_ids, **with_cache(cache))
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            out = model(token, **with_cache(cache))
            token = out.logits[:, -1:].argmax(-1)
        return meter.per_layer()
