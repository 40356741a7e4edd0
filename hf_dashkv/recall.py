"""Attention recall: the share of the true softmax attention mass that DASH-KV's selected rows cover.

The method's own core metric (design §4). Measured at real decode steps: the model decodes greedily with a
DashKVCache, and every selection a hashed layer makes is handed to an observer on the cache
(``DashKVCache.record.observers``), which computes the exact attention of each query head over the whole cache
beside it. The model's outputs are those of "dashkv". :func:`selected_mass` is the one definition of "mass on
the chosen rows", also used by training and by calibration fitting.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

from .cache import DashKVCache
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
        out = model(input_ids, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            out = model(token, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
        return meter.per_layer()
