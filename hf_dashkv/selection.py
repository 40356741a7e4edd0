"""Which cached rows get exact attention at a decode step: sinks + recent window + the budget nearest in Hamming space.

This module owns that decision. Every token stays in the cache; what is not selected is skipped for
this step only. The query heads of a GQA group share one selection per KV head (their distances are
combined by ``DashKVConfig.group_reduce``), so each selected row is gathered once per KV head.
"""

from __future__ import annotations

import torch

from .codes import nearest
from .config import DashKVConfig


def first_valid(valid: torch.Tensor | None, batch: int, device) -> tuple[torch.Tensor, bool]:
    """First non-padding position of each sequence ``[B]``, and whether padding is left padding only.

    Sinks start at the first real token. Left padding (the valid keys of each row are a suffix, what batched
    ``generate`` produces) is the case the compiled kernel handles; other masks take the general path.
    """
    if valid is None:
        return torch.zeros(batch, dtype=torch.long, device=device), True
    first = valid.int().argmax(-1)
    return first, bool((valid.sum(-1) == valid.shape[-1] - first).all())


def candidate_mask(valid: torch.Tensor | None, first: torch.Tensor, n: int, config: DashKVConfig) -> torch.Tensor:
    """bool ``[B, N]``: the positions the budget may choose from, after the sinks and before the recent window.

    Args:
        valid: bool ``[B, N]`` or ``None``; first: ``[B]`` from :func:`first_valid`; n: cached tokens.
    """
    positions = torch.arange(n, device=first.device)
    candidates = (positions >= (first + config.sink_tokens).unsqueeze(1)) & (positions < n - config.recent_tokens)
    return candidates if valid is None else candidates & valid


def select_rows(
    distances: torch.Tensor, valid: torch.Tensor | None, config: DashKVConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the cache that one decode step attends to exactly.

    Args:
        distances: ``[B, Hkv, N]`` from the configured selector (``hf_dashkv.selectors``), lower is nearer.
        valid: bool ``[B, N]``, ``False`` at padding, or ``None`` when every key is visible.
        config: sinks, recent window and budget.

    Returns:
        ``(rows, row_valid)``, each ``[B, Hkv, sinks + recent + budget]``: cache positions (sinks, then the
        recent window, then the nearest in ascending position) and whether each slot is in use. Slots that
        are padding, or duplicates of the recent window, are marked unused.
    """
    batch, kv_heads, n = distances.shape
    sinks, recent = config.sink_tokens, config.recent_tokens
    device = distances.device
    first, _ = first_valid(valid, batch, device)
    if valid is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=device)

    sink_rows = (first.unsqueeze(1) + torch.arange(sinks, device=device)).clamp(max=n - 1)  # [B, S]
    sink_ok = valid.gather(1, sink_rows) & (sink_rows < n - recent)
    recent_rows = torch.arange(n - recent, n, device=device).expand(batch, -1)  # [B, R]
    recent_ok = valid[:, n - recent :]

    candidates = candidate_mask(valid, first, n, config)
    near_rows, near_ok = nearest(distances, candidates.unsqueeze(1).expand_as(distances), config.budget_tokens(n))

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1).expand(-1, kv_heads, -1)

    rows = torch.cat([per_head(sink_rows), per_head(recent_rows), near_rows], dim=-1)
    row_valid = torch.cat([per_head(sink_ok), per_head(recent_ok), near_ok], dim=-1)
    return rows, row_valid


def row_mask(rows: torch.Tensor, row_valid: torch.Tensor, n: int) -> torch.Tensor:
    """The positions in use of a selection, ``rows``/``row_valid`` ``[..., M]`` -> bool ``[..., N]``.

    Counted, not scattered as booleans: unused slots point at real positions too, and a scattered ``False``
    could overwrite a ``True`` for the same position.
    """
    counts = torch.zeros(*rows.shape[:-1], n, dtype=torch.int32, device=rows.device)
    return counts.scatter_add_(-1, rows, row_valid.to(torch.int32)) > 0
