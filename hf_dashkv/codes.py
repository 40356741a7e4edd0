"""Binary codes: sign -> packed bits, Hamming distances, and nearest-k selection.

These are the plain PyTorch definitions. They run on any device and are the reference that the
compiled kernels in ``hf_dashkv.kernels`` are tested against.

Bit layout: bit ``j`` of byte ``i`` holds ``x[..., 8 * i + j] > 0`` (little-endian within a byte), so a code of
``bits`` signs is ``bits // 8`` uint8 values and any multiple of 8 bytes can be reinterpreted as uint64 words.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of ``x`` ``[..., bits]`` into codes ``[..., bits // 8]`` uint8 (bit set where ``x > 0``)."""
    bits = x.shape[-1]
    if bits % 8:
        raise ValueError(f"pack_signs needs a last dimension that is a multiple of 8, got {bits}.")
    on = (x > 0).reshape(*x.shape[:-1], bits // 8, 8).to(torch.uint8)
    return (on * _BIT_WEIGHTS.to(x.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: codes ``[..., nbytes]`` uint8 -> bool ``[..., 8 * nbytes]``."""
    weights = _BIT_WEIGHTS.to(codes.device)
    return (codes.unsqueeze(-1) & weights).ne(0).flatten(-2)


def sign_matrix(codes: torch.Tensor) -> torch.Tensor:
    """Packed codes ``[..., nbytes]`` -> float32 ``[..., bits]`` of ``+1`` / ``-1``.

    For many queries at once (training): the Hamming distance of two codes is ``(bits - a . b) / 2`` of their
    sign vectors, so one matmul gives every query-key distance exactly (integers up to ``bits`` are exact in
    float32), where the xor + popcount table of :func:`hamming_distance` materialises ``[..., N, nbytes]``.
    """
    return unpack_bits(codes).float() * 2 - 1


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distance between packed codes ``a`` and ``b`` (``[..., nbytes]`` uint8, broadcast) -> int32 ``[...]``."""
    return _POPCOUNT8.to(a.device)[torch.bitwise_xor(a, b).long()].sum(-1, dtype=torch.int32)


def head_distances(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Distance of every cached key to each query head of its group, by xor + popcount (one decode step).

    Args:
        query_codes: ``[B, Hkv, G, nbytes]`` (query head ``h`` is ``[h // G, h % G]``); key_codes: ``[B, Hkv, N, nbytes]``.

    Returns:
        int32 ``[B, Hkv, G, N]``.
    """
    return hamming_distance(query_codes.unsqueeze(-2), key_codes.unsqueeze(-3))


def head_distances_many(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """:func:`head_distances` for many query positions at once, by one sign matmul per KV head (training).

    Args:
        query_codes: ``[B, Hkv, P, G, nbytes]``; key_codes: ``[B, Hkv, N, nbytes]``.

    Returns:
        int32 ``[B, Hkv, P, G, N]``, equal to :func:`head_distances` at each position.
    """
    bits = query_codes.shape[-1] * 8
    agree = sign_matrix(query_codes).flatten(2, 3) @ sign_matrix(key_codes).transpose(-1, -2)  # [B, Hkv, P*G, N]
    return ((bits - agree) / 2).to(torch.int32).unflatten(2, query_codes.shape[2:4])


def nearest(distances: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` candidates of smallest distance in each row; ties go to the more recent (later) position.

    This is the definition, in PyTorch (any device). Integer distances (Hamming) are ranked by one integer per
    position, distance first and lateness second, with ``torch.topk``: in PyTorch that measured faster than
    counting (histogram, threshold, tie pass), which is what the compiled CPU kernel does (``kernels.py``).
    Float distances (other selectors) are ranked as they are.

    Args:
        distances: ``[R..., N]``, lower is nearer.
        candidates: bool ``[R..., N]``, the positions that may be chosen.
        k: how many to choose per row.

    Returns:
        ``(positions, valid)``, each ``[R..., k]``: chosen positions in ascending order, and ``False`` where a row
        had fewer than ``k`` candidates (those slots hold position 0 and must be masked).
    """
    lead, n = distances.shape[:-1], distances.shape[-1]
    cand = candidates.reshape(-1, n)
    if distances.is_floating_point():
        rank = torch.where(cand, distances.reshape(-1, n), float("inf"))
    else:
        later_first = n - 1 - torch.arange(n, device=distances.device)
        rank = torch.where(cand, distances.reshape(-1, n).long() * n + later_first, torch.iinfo(torch.long).max)
    chosen = torch.zeros_like(cand)
    if k > 0:
        chosen.scatter_(1, rank.topk(min(k, n), dim=1, largest=False).indices, True)
    return _compact(chosen & cand, k, lead)


def _compact(chosen: torch.Tensor, k: int, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``True`` entries of each row of ``chosen`` ``[R, N]`` (at most ``k``), ascending, padded to
    width ``k``. A scatter to each entry's rank, not ``nonzero``: no data-dependent shape, so no read-back."""
    rows, n = chosen.shape
    slot = torch.where(chosen, chosen.cumsum(1) - 1, k)  # the rest go to a spare column, dropped below
    positions = torch.zeros(rows, k + 1, dtype=torch.long, device=chosen.device)
    positions.scatter_(1, slot, torch.arange(n, device=chosen.device).expand(rows, n))
    valid = torch.arange(k, device=chosen.device) < chosen.sum(1, keepdim=True)
    return positions[:, :k].reshape(*lead, k), valid.reshape(*lead, k)
