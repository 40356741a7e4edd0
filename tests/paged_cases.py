"""Synthetic paged caches for the paged tests (the PyTorch reference's and the Triton kernels'): each request's rows
scattered over shuffled blocks of a shared pool through its block table, as vLLM lays them out, and what the library
gives on each request's contiguous cache."""

import torch

from hf_dashkv.codes import pack_signs
from hf_dashkv.selectors.hash import hash_plan
from hf_dashkv.step import DecodeStep
from hf_dashkv.vllm.paged import PagedLayer, paged_decode

KV_HEADS, GROUP, DIM, BITS, BLOCK = 2, 3, 16, 32, 8


def contiguous(lengths, seed=0):
    """Each request's contiguous K/V ``[1, Hkv, n, D]``, key codes and decode query (with its codes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        key, value = (torch.randn(1, KV_HEADS, n, DIM, generator=g) for _ in range(2))
        codes = pack_signs(torch.randn(1, KV_HEADS, n, BITS, generator=g))
        query = torch.randn(1, KV_HEADS * GROUP, DIM, generator=g)
        query_codes = pack_signs(torch.randn(1, KV_HEADS, GROUP, BITS, generator=g))
        out.append((key, value, codes, query, query_codes))
    return out


def paged(requests, shared=(), num_blocks=40, seed=0):
    """A block pool holding ``requests`` (from :func:`contiguous`) through shuffled block tables.

    ``shared``: pairs ``(r, s, blocks)``: request ``s`` reuses request ``r``'s first ``blocks`` blocks (a shared
    prefix: ``s``'s rows there must equal ``r``'s). Unused blocks hold NaN, so a stray read shows.
    """
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    key = torch.full((num_blocks, KV_HEADS, BLOCK, DIM), float("nan"))
    value = key.clone()
    codes = torch.randint(0, 256, (num_blocks, KV_HEADS, BLOCK, BITS // 8), dtype=torch.uint8, generator=g)
    width = max(-(-r[0].shape[2] // BLOCK) for r in requests)
    table = torch.full((len(requests), width + 2), 999, dtype=torch.int32)  # unused entries point nowhere
    reuse = {s: (r, blocks) for r, s, blocks in shared}
    for i, (k, v, c, _, _) in enumerate(requests):
        n = k.shape[2]
        for b in range(-(-n // BLOCK)):
            if i in reuse and b < reuse[i][1]:
                table[i, b] = table[reuse[i][0], b]
                continue
            block = free.pop()
            table[i, b] = block
            rows = slice(b * BLOCK, min(n, (b + 1) * BLOCK))
            used = rows.stop - rows.start
            key[block, :, :used], value[block, :, :used] = k[0, :, rows], v[0, :, rows]
            codes[block, :, :used] = c[0, :, rows]
    seq_lens = torch.tensor([r[0].shape[2] for r in requests], dtype=torch.int32)
    return PagedLayer(key, value, codes), table, seq_lens


def share_prefix(requests, r, s, tokens):
    """Make request ``s`` start with request ``r``'s first ``tokens`` tokens (K, V and codes)."""
    for a, b in zip(requests[r][:3], requests[s][:3]):
        b[:, :, :tokens] = a[:, :, :tokens]


def expected(requests, policy, scale=0.25):
    """``Plan.attend`` of the plan ``HashSelector`` makes, on each request's contiguous cache."""
    outs, selections = [], []
    for key, value, codes, query, query_codes in requests:
        n = key.shape[2]
        step = DecodeStep(query.unsqueeze(2), key, value, codes, None, scale, 0)
        out, selection = hash_plan(policy, query_codes, policy.budget_tokens(n)).attend(step)
        outs.append(out[0, 0])
        selections.append(selection)
    return torch.stack(outs), selections


def run_paged(requests, layer, table, seq_lens, policy, scale=0.25):
    query = torch.cat([r[3] for r in requests])
    query_codes = torch.cat([r[4] for r in requests])
    return paged_decode(query, query_codes, layer, table, seq_lens, policy, scale)
