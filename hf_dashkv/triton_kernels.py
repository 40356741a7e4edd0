"""Triton kernels for the decode step on CUDA: Hamming distances, the budget selection, attention over the rows.

They compute the PyTorch definition (``codes.head_distances`` -> ``selection.combine_group`` -> ``selection.select``
-> ``exact.attend_rows``, a ``plans.CodePlan``), the rule that ``kernels.decode_attention`` compiles for the CPU, in
three launches, each under ``torch.cuda.device`` of its tensors:

- distances: per (request, KV head) and block of positions, xor + popcount of the packed codes for each query head
  of the group, combined (sum or min); positions outside the candidates get a distance no code can have;
- selection: per (request, KV head), a histogram of the distances (they are small integers), the threshold read
  off its cumulative sum, then one ordered pass that writes the chosen positions ascending, ties to later tokens;
- attention: per (request, KV head), the selected K/V rows read straight from the cache buffer (no gathered copy),
  an online softmax over blocks of rows for all query heads of the group at once; fp32 accumulation, output
  in the query's dtype (fp16, bf16 or fp32).

One set of kernels reads both cache layouts through a block table (slot addressing, as vLLM pages its cache):
position ``p`` of request ``r`` is at block ``block_table[r, p // block_size]``, offset ``p % block_size``, of
``[num_blocks, Hkv, block_size, X]`` buffers with any strides. :func:`paged_decode_attention` takes a serving
engine's paged cache (``hf_dashkv.vllm.paged.paged_decode`` is its reference); the contiguous entry points
(:func:`decode_attention`, :func:`select_nearest`, :func:`attend_rows`, what ``backends.TritonBackend`` runs) pass
their ``[B, Hkv, N, X]`` cache as one block of ``N`` rows per batch row.

Nothing here waits for the device: sizes come from shapes and arguments, and the chosen count stays on the
device. The kernels are tested equal to the definitions under Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors) in CI; only their speed needs a GPU (``dashkv bench --device cuda``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

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
    batch, n, device = query_codes.shape[0], key_codes.shape[2], key_codes.device
    lens = torch.full((batch,), n, dtype=torch.int32, device=device)
    budgets = torch.full((batch,), budget, dtype=torch.int32, device=device)
    lo = first.to(device=device, dtype=torch.int32) + sinks
    return _nearest(query_codes, key_codes, _one_block_each(batch, device), lens, lo, seen, recent, budgets, budget,
                    n, reduce)


def attend_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor,
                valid: torch.Tensor, scale: float) -> torch.Tensor:
    """``exact.attend_rows``: softmax attention of ``query [B, Hq, 1, D]`` over the valid ``rows [B, Hkv, M]`` of
    ``key/value [B, Hkv, N, D]``, read in place -> ``[B, 1, Hq, D]`` in the query's dtype."""
    batch, heads, _, head_dim = query.shape
    q = query.reshape(batch, key.shape[1], heads // key.shape[1], head_dim)
    out = _attend(q, key, value, _one_block_each(batch, query.device), rows, valid, scale)
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).to(query.dtype)


def paged_decode_attention(
    query: torch.Tensor,
    query_codes: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: int,
    recent: int,
    budgets: Sequence[int],
    reduce: str,
    scale: float,
    max_seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode token per request over a paged cache, read in place: ``hf_dashkv.vllm.paged.paged_decode`` for a
    ``CodePlan`` (no re-ranking: ``RerankPlan`` stays with that PyTorch reference).

    Args:
        query: ``[R, Hq, D]``, post-RoPE; query_codes: ``[R, Hkv, G, nbytes]`` uint8.
        key, value: ``[num_blocks, Hkv, block_size, D]``, any strides (vLLM's CPU and GPU layouts are views of
            this); key_codes: ``[num_blocks, Hkv, block_size, nbytes]`` uint8 under the same block ids.
        block_table: ``[R, max_blocks]`` int: request ``r``'s position ``p`` is at block
            ``block_table[r, p // block_size]``, offset ``p % block_size``; entries past a request's last block are
            never read. seq_lens: ``[R]`` int, each request's context, its decode token's key included.
        sinks, recent: the policy's; budgets: ``R`` host ints, each request's ``policy.budget_tokens(seq_lens[r])``
            (a fractional budget differs per request; the metadata builder knows the lengths on the host).
        reduce: ``"sum"`` or ``"min"`` over the group; scale: the attention scaling.
        max_seq_len: an int ``>=`` every ``seq_lens`` (sizes the distances' scratch); default
            ``max_blocks * block_size``, which reads nothing back from the device.

    Returns:
        ``(out [R, Hq, D]`` in the query's dtype, ``rows [R, Hkv, sinks + recent + max(budgets)]`` int64 in each
        request's own positions (sinks, recent window, then the chosen candidates ascending), ``valid`` bool, same
        shape``)``: per request, the valid rows are ``paged_decode``'s selection; slots past its own budget are
        unused.

    A request whose rows cover its context (``sinks + recent + budget >= seq_len``, which the vLLM builder sends to
    the engine's own kernel) is handled, not refused: every position is then selected exactly once, so its output is
    plain attention over the whole context, as ``paged_decode`` gives it (there with no selection); its slots cost
    up to its budget.
    """
    requests, heads, head_dim = query.shape
    kv_heads, block_size = key.shape[1], key.shape[2]
    device = key.device
    if len(budgets) != requests:
        raise ValueError(f"paged_decode_attention: {len(budgets)} budgets for {requests} requests.")
    slots = max(budgets, default=0)
    width = block_table.shape[1] * block_size if max_seq_len is None else max_seq_len
    lens = seq_lens.to(device=device, dtype=torch.int32)
    lo = torch.full((requests,), sinks, dtype=torch.int32, device=device)
    budget_t = torch.tensor(list(budgets), dtype=torch.int32, device=device)
    near_rows, near_valid = _nearest(query_codes, key_codes, block_table, lens, lo, None, recent, budget_t, slots,
                                     width, reduce)
    # the requests stand as the query positions of one sequence that starts at 0: the one layout of the fixed slots
    fixed, ok = fixed_rows(sinks, recent, torch.zeros(1, dtype=torch.long, device=device), lens.long(), width)
    rows = torch.cat([fixed[0, :, None].expand(-1, kv_heads, -1), near_rows], dim=-1)
    valid = torch.cat([ok[0, :, None].expand(-1, kv_heads, -1), near_valid], dim=-1)
    q = query.reshape(requests, kv_heads, heads // kv_heads, head_dim)
    out = _attend(q, key, value, block_table, rows, valid, scale)
    return out.reshape(requests, heads, head_dim).to(query.dtype), rows, valid


def _one_block_each(batch: int, device) -> torch.Tensor:
    """The block table of a contiguous ``[B, Hkv, N, X]`` cache: batch row ``b`` is block ``b`` of ``N`` rows."""
    return torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)


def _on(tensor: torch.Tensor):
    # Triton launches on the current CUDA device, not the tensors': a model split over GPUs needs this
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _nearest(query_codes, key_codes, block_table, lens, lo, seen, recent, budgets, slots, width, reduce):
    """The chosen candidates of each (request, KV head), ``(rows [R, Hkv, slots] ascending, valid)``.

    query_codes ``[R, Hkv, G, nbytes]``; key_codes ``[num_blocks, Hkv, block_size, nbytes]`` through
    ``block_table [R, max_blocks]``; lens, lo, budgets: int32 ``[R]`` on the device (context, first candidate,
    budget); candidates are ``lo <= p < lens - recent`` (and ``seen``, bool ``[R, width]``, where given);
    ``width >= max(lens)``; ``slots >= max(budgets)``.
    """
    requests, kv_heads, group, nbytes = query_codes.shape
    device = key_codes.device
    max_distance = 8 * nbytes * (group if reduce == "sum" else 1)
    not_candidate = max_distance + 1
    bins = triton.next_power_of_2(max_distance + 2)  # every distance, and "not a candidate"
    block = 128
    distances = torch.empty(requests, kv_heads, width, dtype=torch.int32, device=device)
    rows = torch.zeros(requests, kv_heads, max(slots, 1), dtype=torch.int64, device=device)
    counts = torch.zeros(requests, kv_heads, dtype=torch.int32, device=device)
    # without a mask the kernel reads no seen pointer (HAS_SEEN is off); any tensor fills the argument
    seen_i8 = distances if seen is None else seen.to(device=device, dtype=torch.int8).contiguous()
    with _on(key_codes):
        _distances_kernel[(requests * kv_heads, triton.cdiv(width, block))](
            query_codes, key_codes, block_table, lens, lo, seen_i8, distances, recent, width, kv_heads,
            max(key_codes.shape[2], 1), *query_codes.stride(), *key_codes.stride(), *block_table.stride(),
            seen_i8.stride(0), GROUP=group, NBYTES=nbytes, SUM=reduce == "sum", HAS_SEEN=seen is not None,
            NOT_CANDIDATE=not_candidate, BLOCK=block,
        )
        if slots > 0:
            _select_kernel[(requests * kv_heads,)](distances, lens, budgets, rows, counts, width, rows.shape[-1],
                                                   kv_heads, BINS=bins, NOT_CANDIDATE=not_candidate, BLOCK=block)
    rows = rows[:, :, :slots]
    valid = torch.arange(slots, device=device) < counts.unsqueeze(-1)
    return rows, valid


def _attend(q, key, value, block_table, rows, valid, scale):
    """Attention of ``q [R, Hkv, G, D]`` over the valid ``rows [R, Hkv, M]`` (request positions) of
    ``key/value [num_blocks, Hkv, block_size, D]`` through ``block_table`` -> fp32 ``[R, Hkv, G, D]``."""
    requests, kv_heads, group, head_dim = q.shape
    out = torch.empty(requests, kv_heads, group, head_dim, dtype=torch.float32, device=q.device)
    rows, valid = rows.contiguous(), valid.to(torch.int8).contiguous()
    with _on(key):
        _attend_kernel[(requests * kv_heads,)](
            q, key, value, block_table, rows, valid, out, float(scale), rows.shape[-1], kv_heads, group, head_dim,
            max(key.shape[2], 1), *q.stride(), *key.stride(), *value.stride(), *block_table.stride(),
            GROUP_P2=triton.next_power_of_2(group), D_P2=triton.next_power_of_2(head_dim), BLOCK_M=32,
        )
    return out


if triton is not None:

    @triton.jit
    def _popcount(x):
        # SWAR popcount of 32-bit lanes: portable to every backend and to the interpreter
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return (x * 0x01010101) >> 24

    @triton.jit
    def _distances_kernel(q_ptr, k_ptr, table_ptr, lens_ptr, lo_ptr, seen_ptr, out_ptr, recent, width, kv_heads,
                          block_size, sqr, sqh, sqg, sqc, skb, skh, skn, skc, stb, stw, ssr,
                          GROUP: tl.constexpr, NBYTES: tl.constexpr, SUM: tl.constexpr, HAS_SEEN: tl.constexpr,
                          NOT_CANDIDATE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        r, h = pid // kv_heads, pid % kv_heads
        pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        n = tl.minimum(tl.load(lens_ptr + r), width)  # a length past the scratch must not write outside it
        inside = pos < n
        # 64-bit block offsets: a serving engine's pool can hold more than 2**31 elements per layer
        block = tl.load(table_ptr + r * stb + (pos // block_size) * stw, mask=inside, other=0).to(tl.int64)
        k_row = k_ptr + block * skb + h * skh + (pos % block_size) * skn
        combined = tl.zeros([BLOCK], dtype=tl.int32) + (0 if SUM else NOT_CANDIDATE)
        for g in tl.static_range(GROUP):
            distance = tl.zeros([BLOCK], dtype=tl.int32)
            for c in tl.static_range(NBYTES):
                q = tl.load(q_ptr + r * sqr + h * sqh + g * sqg + c * sqc).to(tl.int32)
                k = tl.load(k_row + c * skc, mask=inside, other=0).to(tl.int32)
                distance += _popcount(q ^ k)
            combined = combined + distance if SUM else tl.minimum(combined, distance)
        candidate = inside & (pos >= tl.load(lo_ptr + r)) & (pos < n - recent)
        if HAS_SEEN:
            candidate = candidate & (tl.load(seen_ptr + r * ssr + pos, mask=inside, other=0) != 0)
        tl.store(out_ptr + pid * width + pos, tl.where(candidate, combined, NOT_CANDIDATE), mask=inside)

    @triton.jit
    def _select_kernel(dist_ptr, lens_ptr, budget_ptr, rows_ptr, count_ptr, width, slots, kv_heads,
                       BINS: tl.constexpr, NOT_CANDIDATE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        r = pid // kv_heads
        n = tl.minimum(tl.load(lens_ptr + r), width)
        budget = tl.load(budget_ptr + r)
        base = dist_ptr + pid * width
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
            tl.store(rows_ptr + pid * slots + slot, pos.to(tl.int64), mask=chosen)
            taken += tl.sum(chosen.to(tl.int32), 0)
            ties_seen += tl.sum(tie, 0)
        tl.store(count_ptr + pid, taken)

    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, table_ptr, rows_ptr, valid_ptr, out_ptr, scale, slots, kv_heads, group,
                       head_dim, block_size, sqr, sqh, sqg, sqd, skb, skh, skn, skd, svb, svh, svn, svd, stb, stw,
                       GROUP_P2: tl.constexpr, D_P2: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        r, h = pid // kv_heads, pid % kv_heads
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, D_P2)
        g_ok, d_ok = g < group, d < head_dim
        q = tl.load(q_ptr + r * sqr + h * sqh + g[:, None] * sqg + d[None, :] * sqd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        running_max = tl.full([GROUP_P2], float("-inf"), dtype=tl.float32)
        total = tl.zeros([GROUP_P2], dtype=tl.float32)
        acc = tl.zeros([GROUP_P2, D_P2], dtype=tl.float32)
        for start in range(0, slots, BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            in_range = m < slots
            row = tl.load(rows_ptr + pid * slots + m, mask=in_range, other=0)
            ok = (tl.load(valid_ptr + pid * slots + m, mask=in_range, other=0) != 0) & in_range
            block = tl.load(table_ptr + r * stb + (row // block_size) * stw, mask=ok, other=0).to(tl.int64)
            offset = row % block_size
            rd = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + block[:, None] * skb + h * skh + offset[:, None] * skn + d[None, :] * skd,
                        mask=rd, other=0.0)
            v = tl.load(v_ptr + block[:, None] * svb + h * svh + offset[:, None] * svn + d[None, :] * svd,
                        mask=rd, other=0.0)
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
