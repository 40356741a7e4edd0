"""Triton kernels for the decode step on CUDA: Hamming distances, the budget selection, attention over the rows.

They compute the PyTorch definition (``codes.head_distances`` -> ``selection.combine_group`` -> ``selection.select``
-> ``exact.attend_rows``, a ``plans.CodePlan``), the rule that ``kernels.decode_attention`` compiles for the CPU, in
three launches (``backends.TritonBackend`` runs them, each under ``torch.cuda.device`` of its tensors):

- distances: per (batch, KV head) and block of positions, xor + popcount of the packed codes for each query head
  of the group, combined (sum or min); positions outside the candidates get a distance no code can have;
- selection: per (batch, KV head), a histogram of the distances (they are small integers), the threshold read
  off its cumulative sum, then one ordered pass that writes the chosen positions ascending, ties to later tokens;
- attention: per (batch, KV head), the selected K/V rows read straight from the cache buffer (no gathered copy),
  an online softmax over blocks of rows for all query heads of the group at once; fp32 accumulation, output
  in the query's dtype (fp16, bf16 or fp32).

Nothing here waits for the device: sizes come from shapes and the config, and the chosen count stays on the
device. The kernels are tested equal to the definition under Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors) in CI; only their speed needs a GPU (``dashkv bench --device cuda``).
"""

from __future__ import annotations

import os

import torch

from .selection import fixed_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch definitions still work
    triton = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def decode_attention(
    query: torch.Tensor,
    query_codes: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    first: torch.Tensor,
    sinks: int,
    recent: int,
    budget: int,
    reduce: str,
    scale: float,
    seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step of a hashed layer: ``selection.select`` then ``exact.attend_rows``, as Triton kernels.

    Args and returns as ``kernels.decode_attention`` (the CPU kernel): query ``[B, Hq, 1, D]``, query_codes
    ``[B, Hkv, G, nbytes]``, key/value ``[B, Hkv, N, D]`` and key_codes ``[B, Hkv, N, nbytes]`` (views of the cache's
    buffers), first ``[B]``; -> ``(out [B, 1, Hq, D], rows [B, Hkv, M], valid [B, Hkv, M])``. ``seen``: bool
    ``[B, N]``, ``False`` at padding anywhere (``None``: left padding before ``first``).
    """
    kv_heads, n = key.shape[1], key.shape[2]
    if seen is None:
        seen = torch.arange(n, device=key.device) >= first.view(-1, 1)
    near_rows, near_valid = select_nearest(query_codes, key_codes, first, sinks, recent, budget, reduce, seen)
    ends = torch.full((1,), n, dtype=torch.long, device=key.device)
    rows, ok = fixed_rows(sinks, recent, first, ends, n, seen)  # [B, P = 1, S + R]
    rows = torch.cat([rows.expand(-1, kv_heads, -1), near_rows], dim=-1)
    valid = torch.cat([ok.expand(-1, kv_heads, -1), near_valid], dim=-1)
    return attend_rows(query, key, value, rows, valid, scale), rows, valid


def select_nearest(
    query_codes: torch.Tensor, key_codes: torch.Tensor, first: torch.Tensor, sinks: int, recent: int, budget: int,
    reduce: str, seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``budget`` nearest candidates of each (batch, KV head): ``codes.nearest`` of the combined distances over
    positions ``first + sinks <= p < N - recent`` (and ``seen``, bool ``[B, N]``, where given);
    ``(rows [B, Hkv, budget] ascending, valid)``."""
    batch, kv_heads, group, nbytes = query_codes.shape
    n = key_codes.shape[2]
    device = key_codes.device
    max_distance = 8 * nbytes * (group if reduce == "sum" else 1)
    bins = triton.next_power_of_2(max_distance + 2)  # every distance, and "not a candidate" (max_distance + 1)
    distances = torch.empty(batch, kv_heads, n, dtype=torch.int32, device=device)
    lo = (first.to(device=device, dtype=torch.int32) + sinks).contiguous()
    hi = n - recent
    block = 128
    seen = (torch.ones(batch, n, dtype=torch.int8, device=device) if seen is None else seen.to(torch.int8)).contiguous()
    _distances_kernel[(batch * kv_heads, triton.cdiv(n, block))](
        query_codes, key_codes, distances, lo, seen, hi, n, kv_heads, *query_codes.stride(), *key_codes.stride(),
        GROUP=group, NBYTES=nbytes, SUM=reduce == "sum", NOT_CANDIDATE=max_distance + 1, BLOCK=block,
    )
    rows = torch.zeros(batch, kv_heads, max(budget, 1), dtype=torch.int64, device=device)
    counts = torch.zeros(batch, kv_heads, dtype=torch.int32, device=device)
    if budget > 0:
        _select_kernel[(batch * kv_heads,)](distances, rows, counts, n, budget, BINS=bins,
                                            NOT_CANDIDATE=max_distance + 1, BLOCK=block)
    rows = rows[:, :, :budget]
    valid = torch.arange(budget, device=device) < counts.unsqueeze(-1)
    return rows, valid


def attend_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor,
                valid: torch.Tensor, scale: float) -> torch.Tensor:
    """``exact.attend_rows``: softmax attention of ``query [B, Hq, 1, D]`` over the valid ``rows [B, Hkv, M]`` of
    ``key/value [B, Hkv, N, D]``, read in place -> ``[B, 1, Hq, D]`` in the query's dtype."""
    batch, heads, _, head_dim = query.shape
    kv_heads, slots = key.shape[1], rows.shape[-1]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group, head_dim)
    out = torch.empty(batch, kv_heads, group, head_dim, dtype=torch.float32, device=query.device)
    rows, valid = rows.contiguous(), valid.to(torch.int8).contiguous()
    _attend_kernel[(batch * kv_heads,)](
        q, key, value, rows, valid, out, float(scale), slots, kv_heads, group, head_dim,
        *q.stride(), *key.stride(), *value.stride(),
        GROUP_P2=triton.next_power_of_2(group), D_P2=triton.next_power_of_2(head_dim), BLOCK_M=32,
    )
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).to(query.dtype)


if triton is not None:

    @triton.jit
    def _popcount(x):
        # SWAR popcount of 32-bit lanes: portable to every backend and to the interpreter
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return (x * 0x01010101) >> 24

    @triton.jit
    def _distances_kernel(q_ptr, k_ptr, out_ptr, lo_ptr, seen_ptr, hi, n, kv_heads,
                          sqb, sqh, sqg, sqc, skb, skh, skn, skc,
                          GROUP: tl.constexpr, NBYTES: tl.constexpr, SUM: tl.constexpr,
                          NOT_CANDIDATE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b, h = pid // kv_heads, pid % kv_heads
        pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = pos < n
        combined = tl.zeros([BLOCK], dtype=tl.int32) + (0 if SUM else NOT_CANDIDATE)
        for g in tl.static_range(GROUP):
            distance = tl.zeros([BLOCK], dtype=tl.int32)
            for c in tl.static_range(NBYTES):
                q = tl.load(q_ptr + b * sqb + h * sqh + g * sqg + c * sqc).to(tl.int32)
                k = tl.load(k_ptr + b * skb + h * skh + pos * skn + c * skc, mask=inside, other=0).to(tl.int32)
                distance += _popcount(q ^ k)
            combined = combined + distance if SUM else tl.minimum(combined, distance)
        lo = tl.load(lo_ptr + b)
        seen = tl.load(seen_ptr + b * n + pos, mask=inside, other=0) != 0
        candidate = inside & seen & (pos >= lo) & (pos < hi)
        tl.store(out_ptr + pid * n + pos, tl.where(candidate, combined, NOT_CANDIDATE), mask=inside)

    @triton.jit
    def _select_kernel(dist_ptr, rows_ptr, count_ptr, n, budget,
                       BINS: tl.constexpr, NOT_CANDIDATE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        base = dist_ptr + pid * n
        histogram = tl.zeros([BINS], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            d = tl.load(base + pos, mask=pos < n, other=NOT_CANDIDATE)
            histogram += tl.histogram(d, BINS, mask=(pos < n) & (d < NOT_CANDIDATE))
        bins = tl.arange(0, BINS)
        cumulative = tl.cumsum(histogram, 0)
        # the threshold: the smallest distance whose cumulative count reaches the budget (BINS: every candidate fits)
        threshold = tl.sum((cumulative < budget).to(tl.int32), 0)
        below = tl.sum(tl.where(bins < threshold, histogram, 0), 0)
        ties = tl.sum(tl.where(bins == threshold, histogram, 0), 0)
        skip = ties - (budget - below)  # ties go to later tokens: the first `skip` ties are left out
        taken = tl.full([], 0, tl.int32)  # loop-carried: typed from the start, as the compiler wants
        ties_seen = tl.full([], 0, tl.int32)
        for start in range(0, n, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            d = tl.load(base + pos, mask=pos < n, other=NOT_CANDIDATE)
            tie = ((d == threshold) & (pos < n)).to(tl.int32)
            tie_rank = ties_seen + tl.cumsum(tie, 0)  # 1-based rank among the ties, in position order
            chosen = (d < threshold) | ((tie == 1) & (tie_rank > skip))
            chosen = chosen & (d < NOT_CANDIDATE) & (pos < n)
            slot = taken + tl.cumsum(chosen.to(tl.int32), 0) - 1
            tl.store(rows_ptr + pid * budget + slot, pos.to(tl.int64), mask=chosen)
            taken += tl.sum(chosen.to(tl.int32), 0)
            ties_seen += tl.sum(tie, 0)
        tl.store(count_ptr + pid, taken)

    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, valid_ptr, out_ptr, scale, slots, kv_heads, group, head_dim,
                       sqb, sqh, sqg, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                       GROUP_P2: tl.constexpr, D_P2: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        b, h = pid // kv_heads, pid % kv_heads
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, D_P2)
        g_ok, d_ok = g < group, d < head_dim
        q = tl.load(q_ptr + b * sqb + h * sqh + g[:, None] * sqg + d[None, :] * sqd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        running_max = tl.full([GROUP_P2], float("-inf"), dtype=tl.float32)
        total = tl.zeros([GROUP_P2], dtype=tl.float32)
        acc = tl.zeros([GROUP_P2, D_P2], dtype=tl.float32)
        for start in range(0, slots, BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            in_range = m < slots
            row = tl.load(rows_ptr + pid * slots + m, mask=in_range, other=0)
            ok = (tl.load(valid_ptr + pid * slots + m, mask=in_range, other=0) != 0) & in_range
            rd = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + b * skb + h * skh + row[:, None] * skn + d[None, :] * skd, mask=rd, other=0.0)
            v = tl.load(v_ptr + b * svb + h * svh + row[:, None] * svn + d[None, :] * svd, mask=rd, other=0.0)
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scale  # [G, BLOCK_M]
            scores = tl.where(ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # no valid row yet: nothing to rescale
            weights = tl.exp(scores - safe_max[:, None])
            rescale = tl.exp(running_max - safe_max)
            total = total * rescale + tl.sum(weights, 1)
            acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            running_max = new_max
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_ptr + pid * group * head_dim + g[:, None] * head_dim + d[None, :], out,
                 mask=g_ok[:, None] & d_ok[None, :])
