"""DASH-KV hashing (arXiv 2604.19351): Hamming distance between the query's code and each cached key's code.

The query heads of a GQA group combine their distances (``group_reduce``), so they share one selection.
On the CPU, ``kernels.decode_attention`` computes the same selection fused with attention; this is the
definition, which runs anywhere.
"""

import torch

from ..codes import group_distances


def hash_distances(query: torch.Tensor, key: torch.Tensor, layer, config, scale: float) -> torch.Tensor:
    """``query [B, Hq, D]`` -> int32 ``[B, Hkv, N]``, from the layer's encoders and stored key codes."""
    return group_distances(layer.encoders.encode_query(query), layer.key_codes, config.group_reduce)
