"""Compiled CPU kernels for the decode step: Hamming scoring, nearest-k selection and sparse attention.

They compute exactly the definitions in ``codes.py`` / ``selection.py`` / ``plans.py`` / ``exact.py`` (tested
against them in ``tests/hf_dashkv/test_kernels.py``), faster; ``backends.NumbaBackend`` runs them:

- selection: per (batch, KV head), integer distances by hardware popcount over packed words (one vectorised
  pass over the keys per four query heads), a histogram, the threshold read off it, and one pass that writes
  the chosen positions in ascending order; no per-token float score and no sort;
- attention: each selected K/V row is read once, straight from the cache buffer (no gathered copy),
  with software prefetch of the rows ahead, since scattered rows defeat the hardware prefetcher;
- :func:`decode_attention` does both in one parallel call over (batch, KV head), which saves a thread-pool
  wake-up and the glue between them; with re-ranking (``plans.RerankPlan``) the codes shortlist, the exact
  scores of the shortlisted keys cut it to the budget (a partition, no sort), and attention follows, in the same
  call, reusing those logits (no key row is read twice).
- :func:`store_paged` writes a serving step's new keys, values and key codes at their slots of a paged cache in
  one call (``vllm.paged.store_at_slots``: the sign packing and three slot writes), where PyTorch takes a dozen
  small ops per layer.

Why numba: it installs as a wheel (no compiler at install time, unlike a C++ extension), reaches LLVM's
``ctpop`` and ``prefetch`` intrinsics, runs ``prange`` loops on all cores, and caches machine code on disk.
Where numba is missing, the tensors are not on the CPU, or the dtype is not fp32/bf16, the layer's backend is
another one (chosen once, ``backends.choose_backend``).

Threads and processes: numba's thread pool is process-wide, and its threading layer decides what survives.
GNU OpenMP (numba's pick when TBB is missing) aborts a process forked after the pool started ("fork() called
from a process already using GNU OpenMP"); ``workqueue`` aborts when two Python threads launch kernels at once,
and measured 15-25% slower here. TBB (the ``tbb`` wheel, a dependency) is thread- and fork-safe and as fast as
OpenMP, so the order is TBB, then ``workqueue``, unless ``NUMBA_THREADING_LAYER(_PRIORITY)`` says otherwise.
Launches also take one lock, so the ``workqueue`` fallback is thread-safe too: each launch already uses every
core, so two threads (a web server's two ``generate`` calls) lose nothing by taking turns. A process that forks no
child after its first launch can instead share PyTorch's own OpenMP threads (:func:`share_torch_threads`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .selection import fixed_rows

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # the PyTorch definitions still work
    numba = None
else:
    if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
        numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]  # a permutation of all three

_LAUNCH = threading.Lock()  # one parallel launch at a time (module docstring)


def share_torch_threads() -> None:
    """Run the kernels on GNU OpenMP threads as PyTorch does (numba's ``omp`` layer), as many as PyTorch uses,
    instead of a pool of their own, unless ``NUMBA_THREADING_LAYER(_PRIORITY)`` says otherwise; call it before the
    first launch. numba's OpenMP pool links ``libgomp.so.1``, which the loader resolves to the copy PyTorch loaded
    first, so the kernels' parallel loops run on PyTorch's own threads (one runtime: checked in vLLM's engine with
    ``LD_DEBUG=bindings``). Between two of its parallel ops PyTorch's threads keep spinning on the cores for a while,
    so a second pool launched right after one (TBB's) waits for them. The count matters: each launch sets OpenMP's
    thread count, which other kernels in the process (vLLM's) read. Only for a process that forks no child after its
    first launch (GNU OpenMP, module docstring), such as vLLM's engine, which spawns its workers."""
    if numba is not None and not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
        numba.config.THREADING_LAYER = "omp"
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))

_PREFETCH_ROWS_AHEAD = 8  # the best of 2/4/8/16 for random 512-byte rows (scripts/kernel_ab.py)
_CACHE_LINE = 64
FLOAT_DTYPES = (torch.float32, torch.bfloat16)  # bf16 travels as its bits (uint16) and is widened in-kernel


def nearest_codes(
    query_codes: torch.Tensor, key_codes: torch.Tensor, lo: torch.Tensor, hi: int, budget: int, reduce: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes.nearest(selection.combine_group(codes.head_distances(query_codes, key_codes), reduce), ...)``,
    compiled: the budget nearest candidates of each (batch, KV head).

    The candidates of batch row ``b`` are the positions ``lo[b] <= p < hi`` (left padding and sinks below,
    the recent window above).

    Args:
        query_codes: ``[B, Hkv, G, nbytes]`` uint8.
        key_codes: ``[B, Hkv, N, nbytes]`` uint8 (the cache hands a view of its buffer's first N rows).
        lo: int ``[B]``; hi: int.
        budget: positions to choose per (batch, KV head).
        reduce: ``"sum"`` or ``"min"`` over the G query heads.

    Returns:
        ``(positions int64 [B, Hkv, budget], valid bool [B, Hkv, budget])``.
    """
    batch, heads = query_codes.shape[:2]
    rows = np.zeros((batch, heads, budget), dtype=np.int64)
    valid = np.zeros((batch, heads, budget), dtype=np.bool_)
    q, k, max_distance = _code_arrays(query_codes, _row_buffer(key_codes), reduce)
    tables = np.arange(batch, dtype=np.int64)[:, None]  # one block per sequence, as in decode_attention
    with _LAUNCH:
        _nearest_kernel(q, k, tables, k.shape[2], lo.to(torch.int64).numpy(), hi, budget, reduce == "sum",
                        max_distance, rows, valid)
    return torch.from_numpy(rows), torch.from_numpy(valid)


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
    shortlist: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step of a hashed layer: ``selection.select`` then ``exact.attend_rows``, fused.

    Args:
        query: ``[B, Hq, 1, D]``; query_codes: ``[B, Hkv, G, nbytes]``.
        key, value: ``[B, Hkv, N, D]``, key_codes: ``[B, Hkv, N, nbytes]`` (views of the cache's buffers).
        first: int ``[B]``, the first non-padding position of each sequence (left padding only).
        sinks, recent, budget, reduce: the plan's slots and group rule (budget in tokens).
        scale: the attention scaling.
        shortlist: re-ranking (``plans.RerankPlan``): the codes shortlist this many candidates and the budget
            are those of most exact attention among them (the group's summed softmax over the shortlist, ties
            to the later position). ``None``: no re-ranking.

    Returns:
        ``(output [B, 1, Hq, D] in the query's dtype, rows [B, Hkv, M], row_valid [B, Hkv, M])``,
        ``M = sinks + recent + budget``, the same rows ``selection.select`` returns.
    """
    batch, heads = query.shape[:2]
    n = key.shape[2]
    k, v, k_codes = _row_buffer(key), _row_buffer(value), _row_buffer(key_codes)
    # a contiguous cache is a paged one with a block per sequence: block b holds all of sequence b
    def per_row(x: int) -> torch.Tensor:
        return torch.full((batch,), x, dtype=torch.int64)

    steps = PagedBatch.of(torch.arange(batch)[:, None], k.shape[2], first, per_row(n), sinks, recent,
                          per_row(budget), None if shortlist is None else per_row(shortlist))
    out, rows, valid = _fused_decode(query[:, :, 0], query_codes, k_codes, (k[:, :, None], 0), (v[:, :, None], 0),
                                     steps, reduce, scale)
    return out.reshape(batch, heads, 1, -1).transpose(1, 2), rows, valid


@dataclass(frozen=True)
class PagedBatch:
    """What a batch of decode steps needs from the kernel's side, the same for every layer of a model step (a serving
    engine builds it once per step): where each request's positions live and which rows it attends whatever the
    scores. Arrays, ``R`` requests: ``tables`` int64 ``[R, max_blocks]`` (position ``p`` of request ``r`` at block
    ``tables[r, p // block_size]``, offset ``p % block_size``), ``first``, ``ends`` int64 ``[R]`` (the first real
    position, the context length), ``budgets``, ``shortlists`` int64 ``[R]`` (a shortlist above the budget:
    re-ranking), ``rows`` int64 / ``valid`` bool ``[R, 1, M]``: the sinks and recent window in the first slots
    (``selection.fixed_rows``, the one layout of those slots), the rest for the chosen rows."""

    tables: np.ndarray
    block_size: int
    first: np.ndarray
    ends: np.ndarray
    sinks: int
    recent: int
    budgets: np.ndarray
    shortlists: np.ndarray
    rows: np.ndarray
    valid: np.ndarray

    @classmethod
    def of(cls, tables: torch.Tensor, block_size: int, first: torch.Tensor, ends: torch.Tensor, sinks: int,
           recent: int, budgets: torch.Tensor, shortlists: torch.Tensor | None) -> PagedBatch:
        """The batch of ``R`` requests: ``tables`` int ``[R, max_blocks]``, ``first``, ``ends``, ``budgets`` int
        ``[R]``, ``shortlists`` int ``[R]`` or ``None`` (no re-ranking; a shortlist is raised to the budget). One of
        ``first`` / ``ends`` must be the same for every request: a contiguous cache shares its length, a paged one
        starts every request at 0."""
        first, ends, budgets = first.to(torch.int64), ends.to(torch.int64), budgets.to(torch.int64)
        shortlists = budgets if shortlists is None else torch.maximum(shortlists.to(torch.int64), budgets)
        count, fixed = ends.shape[0], sinks + recent
        if bool((ends == ends[0]).all()):  # [R, 1, S + R]: one context length, a first position per request
            fixed_at, fixed_ok = fixed_rows(sinks, recent, first, ends[:1], int(ends[0]))
        elif bool((first == first[0]).all()):  # [1, R, S + R]: one first position, a context per request
            at, ok = fixed_rows(sinks, recent, first[:1], ends, int(ends.max()))
            fixed_at, fixed_ok = at.transpose(0, 1), ok.transpose(0, 1)
        else:
            raise ValueError("PagedBatch: requests must share either their first position or their context length.")
        rows = np.zeros((count, 1, fixed + int(budgets.max())), dtype=np.int64)
        valid = np.zeros_like(rows, dtype=np.bool_)
        rows[:, :, :fixed], valid[:, :, :fixed] = fixed_at.numpy(), fixed_ok.numpy()
        return cls(tables.to(torch.int64).numpy(), block_size, first.numpy(), ends.numpy(), sinks, recent,
                   budgets.numpy(), shortlists.numpy(), rows, valid)

    @classmethod
    def paged(cls, block_table: torch.Tensor, block_size: int, seq_lens: torch.Tensor, sinks: int, recent: int,
              budgets: torch.Tensor, rerank: int = 1) -> PagedBatch:
        """Decode steps over a paged cache: ``block_table`` int ``[R, max_blocks]``, ``seq_lens`` int ``[R]`` (each
        context, the decode token's own key included), ``budgets`` int ``[R]`` (each request's budget in tokens,
        ``policy.budget_tokens(seq_lens[r])``), ``rerank`` the policy's factor (``> 1``: each request shortlists
        ``rerank * budget`` candidates, as ``plans.RerankPlan``)."""
        budgets = budgets.to(torch.int64)
        return cls.of(block_table, block_size, torch.zeros_like(budgets), seq_lens, sinks, recent, budgets,
                      None if rerank == 1 else rerank * budgets)


def paged_decode_attention(
    query: torch.Tensor,
    query_codes: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    steps: PagedBatch,
    reduce: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`decode_attention` for ``R`` requests over a paged cache, each block read in place by its slot.

    The result is ``hf_dashkv.vllm.paged.paged_decode``'s for requests the budget does not cover (tested equal).

    Args:
        query: ``[R, Hq, D]``, one decode token per request; query_codes: ``[R, Hkv, G, nbytes]``.
        key, value: ``[num_blocks, Hkv, block_size, D]``; read in place where they are the two halves of one
            ``[num_blocks, Hkv, 2, block_size, D]`` slab (a DASH-KV layer's cache in vLLM), copied otherwise;
            key_codes: ``[num_blocks, Hkv, block_size, nbytes]`` uint8, contiguous, the same block ids.
        steps: the requests' block tables, contexts, budgets and fixed rows (:meth:`PagedBatch.paged`).
        reduce, scale: as :func:`decode_attention`.

    Returns:
        ``(output [R, Hq, D], rows [R, Hkv, M], row_valid [R, Hkv, M])``, ``M = sinks + recent + max(budgets)``;
        a request's slots past its own budget are not valid.
    """
    return _fused_decode(query, query_codes, _array(key_codes), *_kv_rows(key, value), steps, reduce, scale)


def store_paged(
    slot_mapping: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_projections: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    code_cache: torch.Tensor,
) -> None:
    """New tokens' keys, values and key codes written at their slots of a paged cache, in place:
    ``hf_dashkv.vllm.paged.store_at_slots`` compiled (tested equal).

    Args:
        slot_mapping: int ``[T]``, token ``t`` at block ``slot // block_size``, offset ``slot % block_size``;
            negative: padding, not written.
        key, value: ``[T, Hkv, D]``, any strides, the caches' dtype.
        key_projections: ``[Hkv, T, bits]``, the key encoder's output before the sign (``KeyEncoder``): bit ``i`` of
            a code is set where ``key_projections[..., i] > 0``.
        key_cache, value_cache: ``[num_blocks, Hkv, block_size, D]``, the two halves of one ``[num_blocks, Hkv, 2,
            block_size, D]`` slab (a DASH-KV layer's cache in vLLM) or C-contiguous; other layouts are refused (the
            write would land in a copy).
        code_cache: ``[num_blocks, Hkv, block_size, bits // 8]`` uint8, C-contiguous.
    """
    (k, k_slot), (v, v_slot) = _kv_rows(key_cache, value_cache, copy=False)
    if not code_cache.is_contiguous():
        raise ValueError("store_paged writes the codes in place: give a C-contiguous code cache.")
    _store_kernel(slot_mapping.to(torch.int64).numpy(), _array(key), _array(value), k, k_slot, v, v_slot,
                  key_projections.float().numpy(), code_cache.numpy())


def _fused_decode(query, query_codes, k_codes, keys, values, steps: PagedBatch, reduce, scale):
    """The one launch behind both entry points: ``query [R, Hq, D]``, ``query_codes [R, Hkv, G, nbytes]``;
    ``k_codes``: an array ``[num_blocks, Hkv, block_size, nbytes]``; ``keys``, ``values``: ``(array, slot)``, the rows
    at ``array[block, head, slot, offset]`` of a C-contiguous ``[num_blocks, Hkv, slots, block_size, D]`` array
    (:func:`_kv_rows`). Returns ``(out [R, Hq, D], rows, valid)``."""
    (k, k_slot), (v, v_slot) = keys, values
    count, heads, head_dim = query.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    rows = np.repeat(steps.rows, kv_heads, axis=1)  # the kernel fills each head's chosen slots
    valid = np.repeat(steps.valid, kv_heads, axis=1)
    out = np.zeros((count, kv_heads, group, v.shape[-1]), dtype=np.float32)
    q_codes, k_words, max_distance = _code_arrays(query_codes, k_codes, reduce)
    with _LAUNCH:
        _decode_kernel(
            query.reshape(count, kv_heads, group, head_dim).float().numpy(), q_codes, k_words, k, k_slot, v, v_slot,
            steps.tables, steps.block_size, steps.first, steps.ends, steps.sinks, steps.recent, steps.budgets,
            steps.shortlists, reduce == "sum", max_distance, np.float32(scale), rows, valid, out,
        )
    output = torch.from_numpy(out).reshape(count, heads, -1).to(query.dtype)
    return output, torch.from_numpy(rows), torch.from_numpy(valid)


def _code_arrays(query_codes: torch.Tensor, key_codes: np.ndarray, reduce: str):
    """Codes as arrays of the widest whole word (uint64 for 64-bit multiples), and the largest distance."""
    word = _word_dtype(query_codes.shape[-1])
    bits, group = query_codes.shape[-1] * 8, query_codes.shape[2]
    max_distance = bits * group if reduce == "sum" else bits
    return query_codes.contiguous().numpy().view(word), key_codes.view(word), max_distance


def _kv_rows(key: torch.Tensor, value: torch.Tensor,
             copy: bool = True) -> tuple[tuple[np.ndarray, int], tuple[np.ndarray, int]]:
    """Logical ``key``, ``value`` views ``[num_blocks, Hkv, block_size, D]`` as the compiled kernels address them:
    C-contiguous arrays ``[num_blocks, Hkv, slots, block_size, D]`` and the slot of each, so that the compiled loads
    of a row are unit-stride (numba compiles generic strided loads for any other view, which LLVM does not
    vectorise). The two halves of one slab ``[num_blocks, Hkv, 2, block_size, D]`` (each block and head's keys then
    values: a DASH-KV layer's cache in vLLM, ``hf_dashkv.vllm.paged.dashkv_kv_views``) are used in place, as are
    C-contiguous keys and values (one slot each); other layouts are copied (``copy``) or refused."""
    blocks, heads, block_size, dim = key.shape
    half = block_size * dim
    slab_strides = (heads * 2 * half, 2 * half, dim, 1)
    in_slab = (
        key.stride() == value.stride() == slab_strides
        and key.untyped_storage().data_ptr() == value.untyped_storage().data_ptr()
        and value.storage_offset() - key.storage_offset() == half
        and (key.storage_offset() + blocks * heads * 2 * half) * key.element_size() <= key.untyped_storage().nbytes()
    )
    if in_slab:
        slab = _array(key.as_strided((blocks, heads, 2, block_size, dim), (heads * 2 * half, 2 * half, half, dim, 1)))
        return (slab, 0), (slab, 1)
    if not copy and not (key.is_contiguous() and value.is_contiguous()):
        raise ValueError("Writing K/V in place needs the two halves of one [num_blocks, Hkv, 2, block_size, D] slab or "
                         f"C-contiguous keys and values; got strides {key.stride()} and {value.stride()}.")
    return (_array(key.contiguous()[:, :, None]), 0), (_array(value.contiguous()[:, :, None]), 0)


def _row_buffer(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous array over the buffer behind ``x``, a ``[:, :, :N]`` view of a ``[B, H, capacity, D]`` buffer.

    The kernels then index a contiguous array (fast) and never copy the cache. Other layouts are copied.
    """
    batch, heads, _, dim = x.shape
    capacity = x.stride(1) // dim if dim else 0
    whole = (batch, heads, capacity, dim)
    contiguous_strides = (heads * capacity * dim, capacity * dim, dim, 1)
    fits = (x.storage_offset() + batch * heads * capacity * dim) * x.element_size() <= x.untyped_storage().nbytes()
    if x.stride() == contiguous_strides and capacity >= x.shape[2] and fits:
        return _array(x.as_strided(whole, contiguous_strides))
    return _array(x.contiguous())


def _array(x: torch.Tensor) -> np.ndarray:
    """``x`` as an array over the same memory, strides kept; bf16 as its bits (uint16)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


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

    @intrinsic
    def _as_float(typingctx, x):
        """float32 as is; uint16 read as the bits of a bfloat16 (the high half of a float32)."""
        if x == types.float32:
            return types.float32(x), lambda context, builder, signature, args: args[0]
        if x == types.uint16:

            def codegen(context, builder, signature, args):
                i32 = context.get_value_type(types.uint32)
                wide = builder.shl(builder.zext(args[0], i32), i32(16))
                return builder.bitcast(wide, context.get_value_type(types.float32))

            return types.float32(x), codegen
        return None

    @intrinsic
    def _prefetch(typingctx, array, b, h, slot, row, col):
        """Ask the CPU to start loading ``array[b, h, slot, row, col]``'s cache line (LLVM ``prefetch``, read,
        keep)."""

        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            data = context.make_array(array_type)(context, builder, args[0])
            pointer = cgutils.get_item_pointer(context, builder, array_type, data, list(args[1:]), wraparound=False)
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
            )
            builder.call(prefetch, [builder.bitcast(pointer, i8p), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(array, b, h, slot, row, col), codegen

    @numba.njit(inline="always")
    def _prefetch_row(array, slot, table, block_size, h, rows, b, m):
        """Start loading each cache line of the row ``_PREFETCH_ROWS_AHEAD`` slots after slot ``m`` of (b, h)'s
        ``rows`` (``array [num_blocks, Hkv, slots, block_size, D]``, C-contiguous)."""
        if m + _PREFETCH_ROWS_AHEAD < rows.shape[2]:
            p = rows[b, h, m + _PREFETCH_ROWS_AHEAD]
            block, offset = table[p // block_size], p % block_size
            for col in range(0, array.shape[4], max(1, _CACHE_LINE // array.itemsize)):
                _prefetch(array, block, h, slot, offset, col)

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def _run_distances(q, keys, b, h, reduce_sum, max_distance, dist, start):
        """Fold the distances of a run of consecutive keys (``keys [count, words]``, contiguous) to (b, h)'s query
        group into ``dist[start:start + count]`` (``selection.combine_group`` of ``codes.head_distances``).

        Codes of one or two words (up to 64 and 128 bits): one pass over the keys serves four query heads, each key
        word loaded once and the heads' query words held in registers; a pass with fewer heads repeats the last one,
        weighted 0 (sum) or pushed past every distance (min). LLVM vectorises it after unswitching the invariant
        branches; a pass per head re-read the keys and, at two words, did not vectorise (~10x slower at 128k).
        Wider codes take a pass per head and word (a third branch in the loop above stops its vectorisation)."""
        group, words = q.shape[2], q.shape[3]
        count = keys.shape[0]
        flat = keys.reshape(count * words)
        out = dist[start:start + count]
        if words > 2:
            part = np.empty(count, np.int32)
            for g in range(group):
                part[:] = 0
                for w in range(words):
                    qw = q[b, h, g, w]
                    for i in range(count):
                        part[i] += _popcount(qw ^ flat[i * words + w])
                for i in range(count):
                    out[i] = out[i] + part[i] if reduce_sum else min(out[i], part[i])
            return
        two = words == 2
        for g in range(0, group, 4):
            h1, h2, h3 = min(g + 1, group - 1), min(g + 2, group - 1), min(g + 3, group - 1)
            w1, w2, w3 = np.int32(g + 1 < group), np.int32(g + 2 < group), np.int32(g + 3 < group)
            o1, o2, o3 = (1 - w1) * max_distance, (1 - w2) * max_distance, (1 - w3) * max_distance
            last = words - 1
            a0, b0, c0, d0 = q[b, h, g, 0], q[b, h, h1, 0], q[b, h, h2, 0], q[b, h, h3, 0]
            a1, b1, c1, d1 = q[b, h, g, last], q[b, h, h1, last], q[b, h, h2, last], q[b, h, h3, last]
            for i in range(count):
                if two:
                    k0, k1 = flat[2 * i], flat[2 * i + 1]
                    x0 = _popcount(a0 ^ k0) + _popcount(a1 ^ k1)
                    x1 = _popcount(b0 ^ k0) + _popcount(b1 ^ k1)
                    x2 = _popcount(c0 ^ k0) + _popcount(c1 ^ k1)
                    x3 = _popcount(d0 ^ k0) + _popcount(d1 ^ k1)
                else:
                    k0 = flat[i]
                    x0, x1, x2, x3 = _popcount(a0 ^ k0), _popcount(b0 ^ k0), _popcount(c0 ^ k0), _popcount(d0 ^ k0)
                if reduce_sum:
                    out[i] += x0 + w1 * x1 + w2 * x2 + w3 * x3
                else:
                    out[i] = min(out[i], x0, x1 + o1, x2 + o2, x3 + o3)

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def _group_distances(q, k, table, block_size, b, h, lo, hi, reduce_sum, max_distance):
        """Each candidate ``lo <= p < hi``'s distance to (b, h)'s query group: int32 ``[hi - lo]``, block by block
        (``k [num_blocks, Hkv, block_size, words]``; position ``p`` at ``table[p // block_size]``)."""
        count = max(hi - lo, 0)
        dist = np.zeros(count, np.int32) if reduce_sum else np.full(count, max_distance, np.int32)
        p = lo
        while p < hi:
            offset = p % block_size
            stop = min(hi, p - offset + block_size)
            _run_distances(q, k[table[p // block_size], h, offset:offset + stop - p], b, h, reduce_sum,
                           max_distance, dist, p - lo)
            p = stop
        return dist

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def _select_nearest(q, k, table, block_size, b, h, lo, hi, budget, reduce_sum, max_distance, rows_out,
                        valid_out, offset):
        """The ``budget`` positions in ``[lo, hi)`` nearest to (b, h)'s query group, into slots ``offset...``."""
        count = max(hi - lo, 0)
        dist = _group_distances(q, k, table, block_size, b, h, lo, hi, reduce_sum, max_distance)
        # four interleaved histograms: distances cluster, and one counter would serialise the increments
        hists = np.zeros((4, max_distance + 1), np.int64)
        for i in range(count):
            hists[i & 3, dist[i]] += 1
        hist = hists.sum(0)
        take = min(budget, count)
        threshold = 0
        below = 0
        while threshold < max_distance and below + hist[threshold] < take:
            below += hist[threshold]
            threshold += 1
        # ties at the threshold go to the latest positions: find where they start
        ties = take - below
        cut = count
        i = count - 1
        while ties > 0:
            if dist[i] == threshold:
                ties -= 1
                cut = i
            i -= 1
        slot = offset
        for i in range(count):
            if dist[i] < threshold or (dist[i] == threshold and i >= cut):
                rows_out[b, h, slot] = lo + i
                valid_out[b, h, slot] = True
                slot += 1

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def _row_logits(q, k, k_slot, table, block_size, b, h, rows, row_valid, scale, stop):
        """``q . k * scale`` of each query head of (b, h)'s group with the valid rows among ``rows[b, h, :stop]``
        (-inf at the others and at slots ``>= stop``): ``[G, M]``. Each key row is read once, with prefetch ahead."""
        group, dim = q.shape[2], q.shape[3]
        logits = np.full((group, rows.shape[2]), -np.inf, np.float32)
        for m in range(stop):
            _prefetch_row(k, k_slot, table, block_size, h, rows, b, m)
            if row_valid[b, h, m]:
                p = rows[b, h, m]
                block, offset = table[p // block_size], p % block_size
                for g in range(group):
                    acc = np.float32(0.0)
                    for d in range(dim):
                        acc += q[b, h, g, d] * _as_float(k[block, h, k_slot, offset, d])
                    logits[g, m] = acc * scale
        return logits

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def _softmax(logits):
        """The softmax of each row of ``logits`` ``[G, M]``, in place."""
        for g in range(logits.shape[0]):
            top = logits[g].max()
            total = np.float32(0.0)
            for m in range(logits.shape[1]):
                w = np.exp(logits[g, m] - top)
                logits[g, m] = w
                total += w
            logits[g] /= total

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def _attend(v, v_slot, table, block_size, b, h, rows, row_valid, logits, out):
        """Softmax attention of (b, h)'s query group over its selected rows, given their ``logits`` ``[G, M]``
        (consumed), into ``out[b, h]``."""
        _softmax(logits)
        for m in range(rows.shape[2]):
            _prefetch_row(v, v_slot, table, block_size, h, rows, b, m)
            if row_valid[b, h, m]:
                p = rows[b, h, m]
                block, offset = table[p // block_size], p % block_size
                for g in range(logits.shape[0]):
                    w = logits[g, m]
                    for d in range(v.shape[4]):
                        out[b, h, g, d] += w * _as_float(v[block, h, v_slot, offset, d])

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _nearest_kernel(q, k, tables, block_size, lo, hi, budget, reduce_sum, max_distance, rows_out, valid_out):
        batch, heads = q.shape[:2]
        for r in numba.prange(batch * heads):
            b, h = r // heads, r % heads
            _select_nearest(q, k, tables[b], block_size, b, h, lo[b], hi, budget, reduce_sum, max_distance,
                            rows_out, valid_out, 0)

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def _rerank(q, k, k_slot, table, block_size, b, h, short_rows, short_valid, budget, scale, rows_out, valid_out,
                logits_out, offset):
        """Of (b, h)'s shortlist (``short_rows[b, h]``, valid ones first, ascending), the ``budget`` rows of most exact
        attention, into slots ``offset...`` in ascending position, with their logits into ``logits_out`` (attention
        then reads no key row twice): the group's summed softmax over the shortlist, ties to the later position."""
        count = short_valid[b, h].sum()
        if count == 0:
            return
        logits = _row_logits(q, k, k_slot, table, block_size, b, h, short_rows, short_valid, scale, count)
        probs = logits.copy()
        _softmax(probs)
        score = np.zeros(count, np.float32)
        for g in range(probs.shape[0]):
            for s in range(count):
                score[s] += probs[g, s]
        # the budget-th largest score is the cut: all above it, and of those equal to it the latest
        cut = np.partition(score, count - budget)[count - budget] if count > budget else np.float32(-1)
        ties = budget - (score > cut).sum()
        chosen = score > cut
        for s in range(count - 1, -1, -1):
            if ties > 0 and score[s] == cut:
                chosen[s] = True
                ties -= 1
        slot = offset
        for s in range(count):
            if chosen[s]:
                rows_out[b, h, slot] = short_rows[b, h, s]
                valid_out[b, h, slot] = True
                logits_out[:, slot] = logits[:, s]
                slot += 1

    @numba.njit(cache=True, nogil=True)
    def _store_kernel(slots, key, value, k, k_slot, v, v_slot, projections, codes):
        """Token ``t``'s key and value rows into ``k[block, h, k_slot, offset]``, ``v[..., v_slot, ...]`` and the signs
        of its projections, packed (bit ``i % 8`` of byte ``i // 8`` set where ``projections[h, t, i] > 0``), into
        ``codes[block, h, offset]``, for each token with a slot ``>= 0``."""
        block_size = k.shape[3]
        for t in range(slots.shape[0]):
            if slots[t] < 0:
                continue
            block, offset = slots[t] // block_size, slots[t] % block_size
            for h in range(key.shape[1]):
                k[block, h, k_slot, offset, :] = key[t, h, :]
                v[block, h, v_slot, offset, :] = value[t, h, :]
                for j in range(codes.shape[3]):
                    byte = 0
                    for bit in range(8):
                        byte |= np.uint8(projections[h, t, 8 * j + bit] > 0) << bit
                    codes[block, h, offset, j] = byte

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _decode_kernel(query, q_codes, k_codes, k, k_slot, v, v_slot, tables, block_size, first, ends, sinks, recent,
                       budgets, shortlists, reduce_sum, max_distance, scale, rows, valid, out):
        """Per (request, KV head): select (and re-rank where ``shortlists[b] > budgets[b]``), then attend; the codes
        ``[num_blocks, Hkv, block_size, words]`` and the rows ``k[block, head, k_slot, offset]``, ``v[..., v_slot,
        ...]`` (``[num_blocks, Hkv, slots, block_size, D]``) are read through ``tables[b]``."""
        batch, heads = q_codes.shape[:2]
        width = shortlists.max() if (shortlists > budgets).any() else 0  # re-ranking's shortlist slots
        short_rows = np.zeros((batch, heads, width), np.int64)
        short_valid = np.zeros((batch, heads, width), np.bool_)
        for r in numba.prange(batch * heads):
            b, h = r // heads, r % heads
            table, budget, shortlist = tables[b], budgets[b], shortlists[b]
            # slots 0 .. sinks + recent came filled (selection.fixed_rows); the nearest candidates follow
            lo, hi = first[b] + sinks, ends[b] - recent
            if shortlist == budget:
                _select_nearest(q_codes, k_codes, table, block_size, b, h, lo, hi, budget, reduce_sum, max_distance,
                                rows, valid, sinks + recent)
                logits = _row_logits(query, k, k_slot, table, block_size, b, h, rows, valid, scale, rows.shape[2])
            else:
                _select_nearest(q_codes, k_codes, table, block_size, b, h, lo, hi, shortlist, reduce_sum,
                                max_distance, short_rows, short_valid, 0)
                logits = _row_logits(query, k, k_slot, table, block_size, b, h, rows, valid, scale, sinks + recent)
                _rerank(query, k, k_slot, table, block_size, b, h, short_rows, short_valid, budget, scale, rows, valid,
                        logits, sinks + recent)
            _attend(v, v_slot, table, block_size, b, h, rows, valid, logits, out)
