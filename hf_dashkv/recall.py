"""Attention recall: the share of the true softmax attention mass that DASH-KV's selected rows cover.

The method's own core metric (design §4). Measured at real decode steps: the model decodes greedily with a
DashKVCache, and at every hashed layer the exact attention of each query head over the whole cache is
computed beside the selection, with the "dashkv-recall" attention implementation registered here. It is a
measurement tool; the model's outputs are those of "dashkv".
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from transformers import AttentionInterface

from .attention import dashkv_attention_forward, key_validity
from .cache import DashKVCache

RECALL_IMPLEMENTATION = "dashkv-recall"


class _RecallMeter:
    """Sums of selected mass per layer, for the cache being measured."""

    def __init__(self, cache: DashKVCache):
        self.cache = cache
        self.sums: dict[int, float] = defaultdict(float)
        self.counts: dict[int, int] = defaultdict(int)

    def per_layer(self) -> dict[int, float]:
        return {i: self.sums[i] / self.counts[i] for i in sorted(self.counts)}


_meter: _RecallMeter | None = None


def _recall_attention_forward(module, query, key, value, attention_mask, **kwargs):
    out = dashkv_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = _meter.cache.layers[module.layer_idx] if _meter is not None else None
    selection = getattr(layer, "last_selection", None)
    if selection is not None:
        layer.last_selection = None  # each selection is counted once
        mass = selected_mass(query, key, attention_mask, *selection, kwargs.get("scaling"))
        _meter.sums[module.layer_idx] += float(mass.mean())
        _meter.counts[module.layer_idx] += 1
    return out


AttentionInterface.register(RECALL_IMPLEMENTATION, _recall_attention_forward)


def selected_mass(query, key, attention_mask, rows, row_valid, scaling) -> torch.Tensor:
    """Softmax mass of each query head on the selected rows: ``[B, Hq]`` in [0, 1].

    Args:
        query: ``[B, Hq, 1, D]``; key: ``[B, Hkv, N, D]``; rows/row_valid: ``[B, Hkv, M]``.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else head_dim**-0.5
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim).float()
    scores = torch.einsum("bkgd,bknd->bkgn", q, key.float()) * scale
    valid = key_validity(attention_mask, key)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    chosen = torch.zeros(batch, kv_heads, n, dtype=probs.dtype).scatter_add_(2, rows, row_valid.to(probs.dtype))
    return torch.einsum("bkgn,bkn->bkg", probs, chosen.clamp(max=1)).reshape(batch, heads)


@contextmanager
def measuring_recall(model, cache: DashKVCache):
    """Within the block, ``model`` decodes as with "dashkv" and records recall for ``cache``; yields the meter.

    ``meter.per_layer()`` gives ``{layer_idx: recall}`` averaged over query heads, batch and decode steps so far.
    """
    global _meter
    previous = model.config._attn_implementation
    model.set_attn_implementation(RECALL_IMPLEMENTATION)
    _meter = meter = _RecallMeter(cache)
    try:
        yield meter
    finally:
        model.set_attn_implementation(previous)
        _meter = None


@torch.inference_mode()
def attention_recall(model, input_ids: torch.Tensor, cache: DashKVCache, decode_steps: int = 8) -> dict[int, float]:
    """Mean selected attention mass per hashed layer over ``decode_steps`` greedy steps after ``input_ids``.

    Returns ``{layer_idx: recall}``, averaged over query heads, batch and steps.
    """
    with measuring_recall(model, cache) as meter:
        out = model(input_ids, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            out = model(token, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
        return meter.per_layer()
