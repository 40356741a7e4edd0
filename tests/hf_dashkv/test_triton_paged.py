"""The Triton kernels over a paged cache (``triton_kernels.paged_decode_attention``) against the paged reference
(``hf_dashkv.vllm.paged.paged_decode``), which is the library's definition on each request's contiguous cache.

Synthetic block pools from ``tests/paged_cases.py`` (shuffled blocks, NaN in the unused ones, partial last blocks,
shared prefix blocks). Tiny shapes: on a GPU where there is one, else under Triton's interpreter on CPU tensors
(``tests/conftest.py``); ``scripts/gpu_check.sh`` runs this file compiled on a GPU.
"""

import pytest
import torch

from hf_dashkv import triton_kernels
from hf_dashkv.policy import DecodePolicy
from hf_dashkv.vllm.paged import PagedLayer, cpu_kv_views
from tests.paged_cases import DIM, GROUP, KV_HEADS, contiguous, paged, run_paged, share_prefix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POLICY = DecodePolicy(budget=5, sink_tokens=2, recent_tokens=4)
SCALE = 0.25


def run_triton(requests, layer, table, seq_lens, policy, dtype=torch.float32, device=DEVICE, **kwargs):
    query = torch.cat([r[3] for r in requests]).to(device, dtype)
    query_codes = torch.cat([r[4] for r in requests]).to(device)
    key, value = (t.to(device, dtype) for t in (layer.key, layer.value))
    budgets = [policy.budget_tokens(n) for n in seq_lens.tolist()]
    return triton_kernels.paged_decode_attention(
        query, query_codes, key, value, layer.key_codes.to(device), table.to(device), seq_lens.to(device),
        policy.sink_tokens, policy.recent_tokens, budgets, policy.group_reduce, SCALE, **kwargs)


def assert_as_reference(requests, layer, table, seq_lens, policy, dtype=torch.float32, **kwargs):
    """Output and selected positions of each request equal the paged reference's; returns the kernels' result."""
    out, rows, valid = run_triton(requests, layer, table, seq_lens, policy, dtype, **kwargs)
    ref_out, selections = run_paged(requests, layer, table, seq_lens, policy, SCALE)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert not out.isnan().any()  # nothing read from unused blocks or past a request's length
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float().cpu(), ref_out, atol=tolerance, rtol=tolerance)
    rows, valid = rows.cpu(), valid.cpu()
    for r, selection in enumerate(selections):
        assert selection is not None, "a covered request: see the covering-budget test"
        for h in range(KV_HEADS):
            assert torch.equal(rows[r, h][valid[r, h]], selection.rows[0, h][selection.valid[0, h]]), (r, h)
    return out, rows, valid


def test_one_request_with_a_partial_last_block_is_the_reference():
    requests = contiguous([29])  # 3 full blocks of 8 and 5 rows of a fourth; the rest of the fourth is NaN
    assert_as_reference(requests, *paged(requests), POLICY)


def test_requests_of_different_lengths_each_get_their_own_selection():
    requests = contiguous([17, 40, 24, 33], seed=1)  # partial, full and one-row last blocks
    _, rows, valid = assert_as_reference(requests, *paged(requests, seed=1), POLICY)
    assert rows.shape == (4, KV_HEADS, 2 + 4 + 5) and bool(valid.all())


def test_requests_sharing_prefix_blocks_read_the_same_physical_rows_there():
    requests = contiguous([30, 37, 21], seed=2)
    share_prefix(requests, 0, 1, 16)
    share_prefix(requests, 0, 2, 16)
    layer, table, seq_lens = paged(requests, shared=[(0, 1, 2), (0, 2, 2)], seed=2)
    assert torch.equal(table[0, :2], table[1, :2]) and torch.equal(table[0, :2], table[2, :2])
    assert_as_reference(requests, layer, table, seq_lens, POLICY)


@pytest.mark.parametrize("policy", [
    DecodePolicy(budget=0.25, sink_tokens=1, recent_tokens=3),  # budgets 6, 11, 4: per request
    DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, group_reduce="min"),
    DecodePolicy(budget=7, sink_tokens=0, recent_tokens=1, group_reduce="sum"),
], ids=["fractional budget", "min over the group", "sum, no sinks, one recent"])
def test_policies_follow_the_reference(policy):
    requests = contiguous([26, 45, 19], seed=3)
    _, _, valid = assert_as_reference(requests, *paged(requests, seed=3), policy)
    budgets = [policy.budget_tokens(n) for n in (26, 45, 19)]
    slots = policy.sink_tokens + policy.recent_tokens
    assert valid[:, :, slots:].sum(-1).tolist() == [[b] * KV_HEADS for b in budgets]  # the longest sets the width


def test_bf16_keys_and_values_follow_the_reference():
    requests = contiguous([27, 34], seed=5)
    layer, table, seq_lens = paged(requests, seed=5)
    half = PagedLayer(layer.key.bfloat16(), layer.value.bfloat16(), layer.key_codes)
    requests = [(k.bfloat16().float(), v.bfloat16().float(), c, q.bfloat16().float(), qc)
                for k, v, c, q, qc in requests]
    out, *_ = run_triton(requests, half, table, seq_lens, POLICY, torch.bfloat16)
    ref_out, _ = run_paged(requests, PagedLayer(half.key.float(), half.value.float(), half.key_codes), table,
                           seq_lens, POLICY, SCALE)
    torch.testing.assert_close(out.float().cpu(), ref_out, atol=2e-2, rtol=2e-2)


def test_keys_and_values_with_vllms_strides_are_read_in_place():
    requests = contiguous([27, 40], seed=7)
    layer, table, seq_lens = paged(requests, seed=7)
    # the CPU layout (keys transposed per block, values after them in one tensor) ...
    physical = torch.cat([layer.key.transpose(-1, -2).flatten(2), layer.value.flatten(2)], dim=-1)
    key, value = cpu_kv_views(physical.view(*layer.key.shape[:3], 2 * DIM))
    assert_as_reference(requests, PagedLayer(key, value, layer.key_codes), table, seq_lens, POLICY)
    # ... and a GPU one, [2, num_blocks, block_size, Hkv, D] (the flash-attention layout), with codes in a wider buffer
    flash = torch.stack([layer.key, layer.value]).transpose(2, 3).contiguous()
    codes = torch.zeros(*layer.key_codes.shape[:3], 16, dtype=torch.uint8)
    codes[..., : layer.key_codes.shape[-1]] = layer.key_codes
    strided = PagedLayer(flash[0].transpose(1, 2), flash[1].transpose(1, 2), codes[..., : layer.key_codes.shape[-1]])
    assert not strided.key.is_contiguous() and not strided.key_codes.is_contiguous()
    assert_as_reference(requests, strided, table, seq_lens, POLICY)


def test_the_scratch_may_be_sized_by_the_longest_request():
    requests = contiguous([13, 22], seed=9)
    layer, table, seq_lens = paged(requests, seed=9)
    assert table.shape[1] * 8 > 22  # the default sizes it by the block table's width
    assert_as_reference(requests, layer, table, seq_lens, POLICY, max_seq_len=22)


def test_a_covering_budget_is_handled_as_plain_attention_over_the_whole_context():
    # the vLLM builder sends such requests to the engine's own kernel; sent here, each position is selected once
    requests = contiguous([9, 30, 3], seed=4)  # 2 + 4 + 5 covers 9 and 3 tokens, not 30
    layer, table, seq_lens = paged(requests, seed=4)
    out, rows, valid = run_triton(requests, layer, table, seq_lens, POLICY)
    ref_out, selections = run_paged(requests, layer, table, seq_lens, POLICY, SCALE)
    assert selections[0] is None and selections[2] is None and selections[1] is not None
    torch.testing.assert_close(out.cpu(), ref_out)
    rows, valid = rows.cpu(), valid.cpu()
    for r, n in ((0, 9), (2, 3)):
        for h in range(KV_HEADS):
            assert sorted(rows[r, h][valid[r, h]].tolist()) == list(range(n))


def test_budgets_must_come_one_per_request():
    requests = contiguous([20, 21])
    layer, table, seq_lens = paged(requests)
    with pytest.raises(ValueError, match="1 budgets for 2 requests"):
        triton_kernels.paged_decode_attention(
            torch.zeros(2, KV_HEADS * GROUP, DIM), torch.cat([r[4] for r in requests]), layer.key, layer.value,
            layer.key_codes, table, seq_lens, 2, 4, [5], "sum", SCALE)


class Recorder:
    """Stands for a kernel: records the current CUDA device at each launch, then launches the kernel."""

    def __init__(self, kernel, devices):
        self.kernel, self.devices = kernel, devices

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.devices.append(torch.cuda.current_device())
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_launch_runs_on_the_device_of_its_tensors(monkeypatch):
    # Triton launches on the current device: with the tensors on the last GPU and the current one the first (they
    # differ where there are two), every launch must still see the tensors' device
    devices = []
    for name in ("_distances_kernel", "_select_kernel", "_attend_kernel"):
        monkeypatch.setattr(triton_kernels, name, Recorder(getattr(triton_kernels, name), devices))
    last = torch.cuda.device_count() - 1
    requests = contiguous([17, 26], seed=10)
    layer, table, seq_lens = paged(requests, seed=10)
    with torch.cuda.device(0):
        out, *_ = run_triton(requests, layer, table, seq_lens, POLICY, device=f"cuda:{last}")
    assert devices == [last] * 3 and out.device == torch.device("cuda", last)
    torch.testing.assert_close(out.cpu(), run_paged(requests, layer, table, seq_lens, POLICY, SCALE)[0])
