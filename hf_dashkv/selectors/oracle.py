"""Oracle: the tokens with the most true attention mass, from exact scores. The ceiling for any selector.

With one selection per KV head (as DASH-KV makes), the best set holds the keys with the largest attention
probability summed over the group's query heads; the distance is minus that sum. It reads every key at every
step, so it is a measuring stick, not a speed-up.
"""

import torch


def oracle_distances(query: torch.Tensor, key: torch.Tensor, layer, config, scale: float) -> torch.Tensor:
    """``query [B, Hq, D]``, ``key [B, Hkv, N, D]`` -> float ``[B, Hkv, N]``: minus the group's summed softmax.

    The softmax runs over every cached key; sinks and the recent window, always attended, change no ranking.
    """
    batch, heads, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    probs = torch.einsum("bkgd,bknd->bkgn", q, key.float()).mul(scale).softmax(-1)
    return -probs.sum(2)
