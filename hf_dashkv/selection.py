"""Which cached rows get exact attention at a decode step: sinks + recent window + the budget nearest in Hamming space.

This module owns that decision. Every token stays in the cache; what is not selected is skipped for
this step only. The query heads of a GQA group share one selection per KV head (their distances are
combined by ``DashKVConfig.group_reduce``), so each selected row is gathered once per KV head.
"""

from __future__ import annotations

import torch

from . import kernels
from .codes import group_distances, nearest
from .config import DashKVConfig


def first_valid(valid: torch.Tensor | None, batch: int, device) -> tuple[torch.Tensor, bool]:
    """First non-padding position of each sequence ``[B]``, and whether padding is left padding only.

    Sinks start at the first real token. Left padding (the valid keys of each row are a suffix, what batched
    ``generate`` produces) is the case the compiled kernels handle; other masks take the general path.
    """
    if valid is None:
        return torch.zeros(batch, dtype=torch.long, device=device), True
    first = valid.int().argmax(-1)
    return first, bool((valid.sum(-1) == valid.shape[-1] - first).all())


def select_rows(
    query_codes: torch.Tensor, key_codes: torch.Tensor, valid: torch.Tensor | None, config: DashKVConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the cache that one decode step attends to exactly.

    Args:
        query_codes: ``[B, Hkv, G, nbytes]`` uint8, the step's query codes grouped by KV head.
        key_codes: ``[B, Hkv, N, nbytes]`` uint8, the cached key codes.
        valid: bool ``[B, N]``, ``False`` at padding, or ``None`` when every key is visible.
        config: sinks, recent window, budget and group reduction.

    Returns:
        ``(rows, row_valid)``, each ``[B, Hkv, sinks + recent + budget]``: cache positions (sinks, then the
        recent window, then the nearest in ascending position) and whether each slot is in use. Slots that
        are padding, or duplicates of the recent window, are marked unused.
    """
    batch, kv_heads, n = key_codes.shape[:3]
    sinks, recent = config.sink_tokens, config.recent_tokens
    budget = config.budget_tokens(n)
    device = key_codes.device
    first, left_padded = first_valid(valid, batch, device)
    if valid is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=device)

    sink_rows = (first.unsqueeze(1) + torch.arange(sinks, device=device)).clamp(max=n - 1)  # [B, S]
    sink_ok = valid.gather(1, sink_rows) & (sink_rows < n - recent)
    recent_rows = torch.arange(n - recent, n, device=device).expand(batch, -1)  # [B, R]
    recent_ok = valid[:, n - recent :]

    lo, hi = first + sinks, n - recent  # hashing candidates: after the sinks, before the recent window
    if left_padded and kernels.supports(key_codes):
        near_rows, near_ok = kernels.nearest_codes(query_codes, key_codes, lo, hi, budget, config.group_reduce)
    else:
        positions = torch.arange(n, device=device)
        candidates = valid & (positions >= lo.unsqueeze(1)) & (positions < hi)
        group = query_codes.shape[2]
        max_distance = config.bits * (group if config.group_reduce == "sum" else 1)
        distances = group_distances(query_codes, key_codes, config.group_reduce)
        near_rows, near_ok = nearest(distances, candidates.unsqueeze(1).expand_as(distances), budget, max_distance)

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1).expand(-1, kv_heads, -1)

    rows = torch.cat([per_head(sink_rows), per_head(recent_rows), near_rows], dim=-1)
    row_valid = torch.cat([per_head(sink_ok), per_head(recent_ok), near_ok], dim=-1)
    return rows, row_valid
