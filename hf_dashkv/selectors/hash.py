"""DASH-KV hashing (arXiv 2604.19351): Hamming distance between the query's code and each cached key's code.

Keys were hashed once, as the cache stored them; the query is hashed here. The query heads of a GQA group
combine their distances (``DashKVConfig.group_reduce``), so they share one selection. On the CPU the whole step
(distances, selection, attention) is one compiled kernel (``kernels.decode_attention``), on CUDA three Triton
kernels (``triton_kernels.decode_attention``), fast paths of the same rule; elsewhere, or with padding that is
not left padding, the PyTorch definition runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels, triton_kernels
from ..codes import head_distances, head_distances_many
from ..encoders import LayerEncoders
from ..selection import Selection, combine_group
from .base import DecodeStep, Selector


@dataclass
class HashSelector(Selector):
    """Nearest keys in Hamming space, with the layer's trained (or random: SimHash) ``encoders``."""

    encoders: LayerEncoders

    def head_distances(self, step: DecodeStep) -> tuple[torch.Tensor, torch.Tensor]:
        """The query's codes ``[B, Hkv, G, nbytes]`` and each query head's distances, int32 ``[B, Hkv, G, N]``."""
        query_codes = self.encoders.encode_query(step.query[:, :, 0])
        return query_codes, head_distances(query_codes, step.key_codes)

    def scores_from(self, step: DecodeStep, per_head: torch.Tensor) -> torch.Tensor:
        """The group's combined distances ``[B, Hkv, N]`` from per-head ones (wrappers add their terms here)."""
        return combine_group(per_head, self.config.group_reduce)

    def scores(self, step: DecodeStep) -> torch.Tensor:
        return self.scores_from(step, self.head_distances(step)[1])

    def position_scores(self, query: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
        """Distances for many query positions at once (training, measurement), by sign matmul.

        Args:
            query: post-RoPE ``[B, Hq, P, D]``; key_codes: ``[B, Hkv, N, nbytes]``.

        Returns:
            int32 ``[B, Hkv, P, N]``, what :meth:`scores` gives at each position.
        """
        batch, length = query.shape[0], query.shape[2]
        query_codes = self.encoders.encode_query(query.transpose(1, 2).flatten(0, 1))  # [B * P, Hkv, G, nbytes]
        query_codes = query_codes.unflatten(0, (batch, length)).transpose(1, 2)  # [B, Hkv, P, G, nbytes]
        return combine_group(head_distances_many(query_codes, key_codes), self.config.group_reduce)

    def decode(self, step: DecodeStep) -> tuple[torch.Tensor, Selection]:
        """Codes -> selection -> attention as compiled kernels where they run: numba on the CPU (left padding or
        none), Triton on CUDA (any padding; nothing read back from the device); else the PyTorch definition
        (:meth:`select`, then exact attention)."""
        if kernels.supports_decode(step.key, step.value) and step.left_padded():
            return self.compiled_decode(kernels, step)
        if triton_kernels.supports_decode(step.key, step.value):
            return self.compiled_decode(triton_kernels, step, seen=step.valid)
        return super().decode(step)

    def compiled_decode(self, module, step: DecodeStep, **extra) -> tuple[torch.Tensor, Selection]:
        """The step by ``module.decode_attention`` (``kernels`` or ``triton_kernels``; ``extra``: its own options)."""
        query_codes = self.encoders.encode_query(step.query[:, :, 0])
        config = self.config
        out, rows, valid = module.decode_attention(
            step.query, query_codes, step.key, step.value, step.key_codes, step.first, config.sink_tokens,
            config.recent_tokens, config.budget_tokens(step.n), config.group_reduce, step.scale, **extra,
        )
        return out, Selection(rows, valid)
