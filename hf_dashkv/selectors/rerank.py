"""Re-ranking: the hash codes shortlist ``rerank x budget`` candidates, exact scores pick the budget among them.

A wrapper around the hash selector (HashAttention and HATA keep to one stage; this trades key reads for recall):
the shortlist is the hash selector's nearest candidates, and each shortlisted key's score becomes minus the
group's summed softmax of ``q . k * scale`` over the shortlist, the oracle's score restricted to what the codes
found. It reads ``rerank x budget`` more key rows per KV head and step than plain hashing (no values). On the CPU
the whole step (shortlist, exact scores, attention) is one compiled kernel (``kernels.decode_attention`` with a
``shortlist``); elsewhere the PyTorch definition below runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..codes import nearest
from ..config import DashKVConfig
from ..exact import gather_rows
from ..selection import candidates, first_position
from .base import DecodeStep, Selector
from .hash import HashSelector


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


def rerank_scores(query: torch.Tensor, key: torch.Tensor, distances: torch.Tensor, config: DashKVConfig,
                  ends: torch.Tensor, valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Exact scores on the hash shortlist, float ``[B, Hkv, P, N]`` (lower is nearer; ``+inf`` off the shortlist).

    Args:
        query: ``[B, Hq, P, D]``; key: ``[B, Hkv, N, D]``; distances: the hash selector's ``[B, Hkv, P, N]``;
        config: budget, sinks, recent window and ``rerank``; ends: ``[P]``, each query's context length;
        valid: bool ``[B, N]`` or ``None``; scale: the attention scaling.
    """
    batch, kv_heads, length, n = distances.shape
    first = first_position(valid, batch, distances.device)
    allowed = candidates(config, first, ends, n, valid).unsqueeze(1).expand_as(distances)
    out = torch.full(distances.shape, float("inf"), device=distances.device)
    shortlists = [config.rerank * config.budget_tokens(int(end)) for end in ends.tolist()]
    for size in sorted(set(shortlists)):  # a fractional budget grows with the context
        index = torch.tensor([i for i, s in enumerate(shortlists) if s == size], device=distances.device)
        rows, ok = nearest(distances[:, :, index], allowed[:, :, index], size)  # [B, Hkv, p, size]
        out[:, :, index] = shortlist_scores(query[:, :, index], key, rows, ok, scale, n)
    return out


@dataclass
class RerankSelector(Selector):
    """``inner``'s Hamming distances shortlist ``config.rerank x budget`` candidates; exact scores rank them."""

    inner: HashSelector  # built with the same config, so the inherited ``covers`` holds for both

    def decode(self, step: DecodeStep):
        """On the CPU (left padding or none) one compiled kernel; else :meth:`scores`, selection, exact attention."""
        if kernels.supports_decode(step.key, step.value) and step.left_padded():
            shortlist = self.config.rerank * self.config.budget_tokens(step.n)
            return self.inner.compiled_decode(kernels, step, shortlist=shortlist)
        return super().decode(step)

    def scores(self, step: DecodeStep) -> torch.Tensor:
        """On the CPU (left padding or none) the compiled kernel finds the shortlist; else the PyTorch definition."""
        if not (kernels.supports(step.key_codes) and step.left_padded()):
            distances = self.inner.scores(step).unsqueeze(2)
            return rerank_scores(step.query, step.key, distances, self.config, step.ends, step.valid,
                                 step.scale)[:, :, 0]
        config = self.config
        query_codes = self.inner.encoders.encode_query(step.query[:, :, 0])
        rows, ok = kernels.nearest_codes(query_codes, step.key_codes, step.first + config.sink_tokens,
                                         step.n - config.recent_tokens, config.rerank * config.budget_tokens(step.n),
                                         config.group_reduce)
        return shortlist_scores(step.query, step.key, rows.unsqueeze(2), ok.unsqueeze(2), step.scale, step.n)[:, :, 0]
