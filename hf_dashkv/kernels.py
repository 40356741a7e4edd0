"""Compiled CPU kernel: Hamming scoring and nearest-k selection of packed codes in one pass per KV head.

Same definition as ``codes.group_distances`` + ``codes.nearest`` (ties go to the later position), without
materialising per-token float scores or sorting: per (batch, KV head) it computes integer distances with
hardware popcount on 64-bit words, counts them into a histogram, reads the threshold off it, and writes
the chosen positions in ascending order. Rows run in parallel threads.

Why numba: it ships as a wheel (no compiler at install time, unlike a C++ extension), compiles to LLVM with
the ``ctpop`` intrinsic, and caches the machine code on disk; ``tests/test_kernels.py`` checks it against the
PyTorch reference. Where numba is missing or the tensors are not on the CPU, ``supports`` says no and the
PyTorch reference runs instead.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # the reference path in codes.py still works
    numba = None


def supports(key_codes: torch.Tensor, candidates: torch.Tensor) -> bool:
    """Whether :func:`nearest_codes` can run on these tensors (CPU, numba installed)."""
    return numba is not None and key_codes.device.type == "cpu" and candidates.device.type == "cpu"


def nearest_codes(
    query_codes: torch.Tensor, key_codes: torch.Tensor, candidates: torch.Tensor, budget: int, reduce: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``nearest(group_distances(query_codes, key_codes, reduce), candidates, budget)``.

    Args:
        query_codes: ``[B, Hkv, G, nbytes]`` uint8.
        key_codes: ``[B, Hkv, N, nbytes]`` uint8 (may be a view with a row stride).
        candidates: bool ``[B, N]``.
        budget: positions to choose per (batch, KV head).
        reduce: ``"sum"`` or ``"min"`` over the G query heads.

    Returns:
        ``(positions int64 [B, Hkv, budget], valid bool [B, Hkv, budget])``.
    """
    word = _word_dtype(query_codes.shape[-1])
    q = query_codes.contiguous().numpy().view(word)
    k = key_codes.numpy().view(word)
    cand = candidates.contiguous().numpy()
    batch, heads, group = query_codes.shape[:3]
    bits = query_codes.shape[-1] * 8
    max_distance = bits * group if reduce == "sum" else bits
    rows = np.zeros((batch, heads, budget), dtype=np.int64)
    valid = np.zeros((batch, heads, budget), dtype=np.bool_)
    _nearest_kernel(q, k, cand, budget, reduce == "sum", max_distance, rows, valid)
    return torch.from_numpy(rows), torch.from_numpy(valid)


def _word_dtype(nbytes: int):
    for width, dtype in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if nbytes % width == 0:
            return dtype
    return np.uint8


if numba is not None:

    @intrinsic
    def _popcount(typingctx, x):
        """LLVM ``ctpop`` on an unsigned integer: one instruction where the CPU has it."""
        if not isinstance(x, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            value = builder.ctpop(args[0])
            return builder.zext(value, context.get_value_type(types.int64))

        return types.int64(x), codegen

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _nearest_kernel(q, k, cand, budget, reduce_sum, max_distance, rows_out, valid_out):
        batch, heads, group, words = q.shape
        n = k.shape[2]
        for r in numba.prange(batch * heads):
            b = r // heads
            h = r % heads
            dist = np.empty(n, np.int32)
            hist = np.zeros(max_distance + 1, np.int64)
            count = 0
            for pos in range(n):
                if not cand[b, pos]:
                    continue
                d = 0 if reduce_sum else max_distance
                for g in range(group):
                    dg = 0
                    for w in range(words):
                        dg += _popcount(q[b, h, g, w] ^ k[b, h, pos, w])
                    d = d + dg if reduce_sum else min(d, dg)
                dist[pos] = d
                hist[d] += 1
                count += 1
            take = min(budget, count)
            threshold = 0
            below = 0
            while threshold < max_distance and below + hist[threshold] < take:
                below += hist[threshold]
                threshold += 1
            # ties at the threshold go to the latest positions: find where they start
            ties = take - below
            cut = n
            pos = n - 1
            while ties > 0:
                if cand[b, pos] and dist[pos] == threshold:
                    ties -= 1
                    cut = pos
                pos -= 1
            slot = 0
            for pos in range(n):
                if cand[b, pos] and (dist[pos] < threshold or (dist[pos] == threshold and pos >= cut)):
                    rows_out[b, h, slot] = pos
                    valid_out[b, h, slot] = True
                    slot += 1
