"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks + a recent window, nothing else.

No token is chosen by content, so every distance is the same and ``select_rows`` gives it no budget.
"""

import torch


def streaming_distances(query: torch.Tensor, key: torch.Tensor, layer, config, scale: float) -> torch.Tensor:
    """Zeros ``[B, Hkv, N]`` (a broadcast view, no memory): no token is nearer than another."""
    return torch.zeros(1, 1, 1, device=key.device).expand(key.shape[0], key.shape[1], key.shape[2])
