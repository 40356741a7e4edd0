"""The paged reference (``hf_dashkv.vllm.paged``) against the library's definition on the contiguous cache.

Synthetic paged caches: each request's rows are scattered over shuffled blocks of a shared pool through its block
table, as vLLM lays them out; the reference must give, per request, ``Plan.attend``'s output and selection on the
request's contiguous K/V and codes. Pure PyTorch: vLLM is not needed (nor imported).
"""

import subprocess
import sys

import pytest
import torch

from hf_dashkv.policy import DecodePolicy
from hf_dashkv.step import DecodeStep
from hf_dashkv.vllm.paged import (
    PagedLayer,
    cpu_kv_views,
    dashkv_kv_views,
    first_selected,
    relayout_keys,
    stock_layout_copy,
    write_at_slots,
)
from tests.paged_cases import BITS, BLOCK, DIM, GROUP, KV_HEADS, contiguous, expected, paged, run_paged, share_prefix


def assert_same(requests, layer, table, seq_lens, policy):
    out, selections = run_paged(requests, layer, table, seq_lens, policy)
    ref_out, ref_selections = expected(requests, policy)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(selections, ref_selections):
        assert torch.equal(got.rows, want.rows) and torch.equal(got.valid, want.valid)
    assert not out.isnan().any()  # nothing read from blocks outside the tables
    return selections


POLICY = DecodePolicy(budget=5, sink_tokens=2, recent_tokens=4)


def test_one_request_with_a_partial_last_block_is_the_contiguous_definition():
    requests = contiguous([29])  # 3 full blocks of 8 and 5 rows of a fourth
    assert_same(requests, *paged(requests), POLICY)


def test_requests_of_different_lengths_each_get_their_own_selection():
    requests = contiguous([17, 40, 24, 33], seed=1)  # partial, full and one-row last blocks
    selections = assert_same(requests, *paged(requests, seed=1), POLICY)
    assert [s.rows.shape for s in selections] == [(1, KV_HEADS, 2 + 4 + 5)] * 4


def test_requests_sharing_prefix_blocks_read_the_same_physical_rows_there():
    requests = contiguous([30, 37, 21], seed=2)
    share_prefix(requests, 0, 1, 16)  # two full blocks shared by requests 0 and 1
    share_prefix(requests, 0, 2, 16)
    layer, table, seq_lens = paged(requests, shared=[(0, 1, 2), (0, 2, 2)], seed=2)
    assert torch.equal(table[0, :2], table[1, :2]) and torch.equal(table[0, :2], table[2, :2])
    assert_same(requests, layer, table, seq_lens, POLICY)


@pytest.mark.parametrize("policy", [
    DecodePolicy(budget=0.25, sink_tokens=1, recent_tokens=3),  # a fractional budget grows with each context
    DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, group_reduce="min"),
    DecodePolicy(budget=3, sink_tokens=2, recent_tokens=4, rerank=3),  # codes shortlist 9, exact scores keep 3
], ids=["fractional budget", "min over the group", "rerank"])
def test_policies_follow_the_contiguous_definition(policy):
    requests = contiguous([26, 45, 19], seed=3)
    assert_same(requests, *paged(requests, seed=3), policy)


def test_a_covering_budget_is_plain_attention_over_the_whole_context():
    requests = contiguous([9, 30], seed=4)  # 2 + 4 + 5 covers 9 tokens, not 30
    out, selections = run_paged(requests, *paged(requests, seed=4), POLICY)
    key, value, _, query, _ = requests[0]
    dense = torch.nn.functional.scaled_dot_product_attention(
        query.view(1, KV_HEADS, GROUP, DIM), key, value, scale=0.25).reshape(-1, DIM)
    torch.testing.assert_close(out[0], dense)
    assert selections[0] is None and selections[1] is not None


def test_write_at_slots_stores_at_the_slots_and_skips_padding():
    codes = torch.zeros(4, KV_HEADS, BLOCK, BITS // 8, dtype=torch.uint8)
    new = torch.randint(1, 256, (3, KV_HEADS, BITS // 8), dtype=torch.uint8)
    write_at_slots(torch.tensor([13, -1, 2]), (codes, new))
    assert torch.equal(codes[1, :, 5], new[0]) and torch.equal(codes[0, :, 2], new[2])
    assert int((codes != 0).any(-1).sum()) == 2 * KV_HEADS  # the padding token wrote nothing


def test_written_codes_read_back_through_the_block_table_as_the_contiguous_codes():
    # tokens of two requests written in one mixed batch by slot_mapping, then read back per request
    requests = contiguous([11, 7], seed=6)
    table = torch.tensor([[3, 0], [1, 2]])
    slot_mapping = torch.cat([table[0, torch.arange(11) // BLOCK] * BLOCK + torch.arange(11) % BLOCK,
                              table[1, torch.arange(7) // BLOCK] * BLOCK + torch.arange(7) % BLOCK])
    codes = torch.zeros(4, KV_HEADS, BLOCK, BITS // 8, dtype=torch.uint8)
    write_at_slots(slot_mapping, (codes, torch.cat([r[2][0].transpose(0, 1) for r in requests])))
    layer = PagedLayer(torch.zeros(4, KV_HEADS, BLOCK, DIM), torch.zeros(4, KV_HEADS, BLOCK, DIM), codes)
    for r, n in enumerate((11, 7)):
        step = layer.request_step(torch.zeros(KV_HEADS * GROUP, DIM), table[r], n, 0.25, 0)
        assert torch.equal(step.key_codes, requests[r][2])


def test_cpu_kv_views_read_vllms_cpu_layout_keys_transposed_per_block():
    # vLLM 0.32's CPU cache (vec ISA, fp32), as scripts/vllm_inspect.py found it: per [block, head], the keys
    # transposed [D, block_size], then the values [block_size, D], in a [num_blocks, Hkv, block_size, 2 * D] tensor
    key, value = torch.randn(2, 5, KV_HEADS, BLOCK, DIM).unbind(0)
    physical = torch.cat([key.transpose(-1, -2).flatten(2), value.flatten(2)], dim=-1)
    kv_cache = physical.view(5, KV_HEADS, BLOCK, 2 * DIM)
    key_view, value_view = cpu_kv_views(kv_cache)
    assert torch.equal(key_view, key) and torch.equal(value_view, value)
    kv_cache[3, 1].view(-1)[DIM * 0 + 2 * BLOCK + 7] = 42.0  # key of offset 7, dimension 2: in place, no copy
    assert key_view[3, 1, 7, 2] == 42.0


def test_a_dashkv_layer_keeps_its_keys_row_major_and_vllms_kernel_gets_a_copy_in_its_layout():
    # K/V written by slot into a DASH-KV layer's cache ([num_blocks, Hkv, block_size, 2 * D], vLLM's shape): each
    # [block, head] holds its keys row-major, then its values
    kv_cache = torch.zeros(5, KV_HEADS, BLOCK, 2 * DIM)
    key_view, value_view = dashkv_kv_views(kv_cache)
    slots = torch.tensor([3 * BLOCK + 7, -1, 1 * BLOCK + 0, 4 * BLOCK + BLOCK - 1])
    key, value = torch.randn(2, 4, KV_HEADS, DIM).unbind(0)
    write_at_slots(slots, (key_view, key), (value_view, value))
    assert torch.equal(kv_cache[3].reshape(KV_HEADS, -1)[:, 7 * DIM:8 * DIM], key[0])  # in memory: one row
    assert torch.equal(value_view[1, :, 0], value[2]) and torch.equal(key_view[4, :, BLOCK - 1], key[3])
    assert int((key_view != 0).any(-1).sum()) == int((value_view != 0).any(-1).sum()) == 3 * KV_HEADS  # not padding
    # blocks 4 and 3, copied in vLLM's layout (keys transposed per block), as block 0 and 1 of the copy
    copy = stock_layout_copy(key_view, value_view, torch.tensor([4, 3]))
    copy_key, copy_value = cpu_kv_views(copy)
    assert copy.shape == (2, KV_HEADS, BLOCK, 2 * DIM)
    assert torch.equal(copy_key, key_view[[4, 3]]) and torch.equal(copy_value, value_view[[4, 3]])
    in_memory = copy[1].reshape(KV_HEADS, -1)[:, : BLOCK * DIM].view(KV_HEADS, DIM, BLOCK)
    assert torch.equal(in_memory[:, :, 7], key[0])  # a column: transposed


def test_relayout_keys_switches_a_layer_between_the_two_layouts_in_place():
    kv_cache = torch.randn(5, KV_HEADS, BLOCK, 2 * DIM)
    key, value = (t.clone() for t in dashkv_kv_views(kv_cache))
    relayout_keys(kv_cache, to_stock=True, blocks_at_once=2)  # chunks of 2, 2 and 1 blocks
    stock_key, stock_value = cpu_kv_views(kv_cache)
    assert torch.equal(stock_key, key) and torch.equal(stock_value, value)
    relayout_keys(kv_cache, to_stock=False)
    assert torch.equal(dashkv_kv_views(kv_cache)[0], key)


def test_the_paged_reference_runs_on_the_cpu_layout_views():
    requests = contiguous([27, 40], seed=7)
    layer, table, seq_lens = paged(requests, seed=7)
    physical = torch.cat([layer.key.transpose(-1, -2).flatten(2), layer.value.flatten(2)], dim=-1)
    key, value = cpu_kv_views(physical.view(*layer.key.shape[:3], 2 * DIM))
    viewed = PagedLayer(key, value, layer.key_codes)
    torch.testing.assert_close(run_paged(requests, viewed, table, seq_lens, POLICY)[0],
                               expected(requests, POLICY)[0])


def test_importing_the_paged_reference_does_not_import_vllm():
    code = "import sys, hf_dashkv.vllm.paged; assert 'vllm' not in sys.modules, 'vllm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_library_never_imports_its_vllm_plugin():
    # the apps may (`dashkv serve` launches vLLM with it); the library core never does
    from tests.test_layering import REPO, imported_modules

    found = [f"{path.relative_to(REPO)} imports {name}"
             for path in sorted((REPO / "hf_dashkv").rglob("*.py"))
             if not any(path.is_relative_to(REPO / "hf_dashkv" / part) for part in ("vllm", "apps"))
             for name in imported_modules(path) if name == "hf_dashkv.vllm" or name.startswith("hf_dashkv.vllm.")]
    assert found == []


def test_with_real_encoders_the_paged_reference_is_what_the_hash_selector_does_in_generate():
    # the selector generate runs (HashSelector.plan, which encodes the query itself) on each contiguous cache,
    # against the paged reference given the batch's query codes encoded at once, as a vLLM layer would
    from transformers import LlamaConfig

    from hf_dashkv import EncoderConfig, HashEncoders
    from hf_dashkv.selectors import HashSelector

    config = LlamaConfig(hidden_size=KV_HEADS * GROUP * DIM, num_attention_heads=KV_HEADS * GROUP,
                         num_key_value_heads=KV_HEADS, num_hidden_layers=2, head_dim=DIM)
    encoders = HashEncoders.random(config, EncoderConfig(bits=BITS, query_hidden=8), seed=3)[1]
    requests = contiguous([31, 44], seed=8)
    requests = [(k, v, encoders.encode_keys(k), q, encoders.encode_query(q)) for k, v, _, q, _ in requests]
    for policy in (POLICY, DecodePolicy(budget=3, sink_tokens=2, recent_tokens=4, rerank=2)):
        out, selections = run_paged(requests, *paged(requests, seed=8), policy)
        for r, (key, value, codes, query, _) in enumerate(requests):
            step = DecodeStep(query.unsqueeze(2), key, value, codes, None, 0.25, 1)
            want, selection = HashSelector(encoders).plan(step, policy).attend(step)
            torch.testing.assert_close(out[r], want[0, 0])
            assert torch.equal(selections[r].rows, selection.rows)


def test_first_selected_decodes_generated_positions_the_budget_does_not_cover():
    # covers a context of n tokens iff n <= 2 + 4 + 5 = 11
    # request: (computed before this step, query tokens, prompt length) -> its first selected position
    cases = [
        ((0, 30, 30), 30),    # a whole prompt: dense
        ((10, 10, 30), 20),   # a chunk inside the prompt: dense (not capped at the prompt's end)
        ((29, 1, 30), 30),    # the prompt's last token, alone in its chunk: dense, though one token
        ((30, 1, 30), 30),    # a decode step past the budget: selected
        ((8, 1, 8), 9),       # a decode step the budget covers (context 9): dense
        ((0, 34, 30), 30),    # a preempted request recomputed: its 4 generated positions replay as decode steps
        ((0, 14, 6), 11),     # the same with a short prompt: positions 6..10 (contexts 7..11) are covered
        ((0, 12, 0), 12),     # no request (a warm-up row): dense
    ]
    computed = torch.tensor([c for (c, _, _), _ in cases])
    counts = torch.tensor([q for (_, q, _), _ in cases])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    prompts = torch.tensor([p for (_, _, p), _ in cases])
    split = first_selected(starts, computed + counts, prompts, POLICY)
    assert split.tolist() == [want for _, want in cases]
    # a fractional budget: coverage shrinks as the context grows, so the selected positions are a suffix
    fractional = DecodePolicy(budget=0.25, sink_tokens=2, recent_tokens=2)
    (first,) = first_selected(torch.tensor([0, 10]), torch.tensor([10]), torch.tensor([1]), fractional).tolist()
    assert first == 6  # context 6 is covered by 4 + ceil(1.5) = 6 rows; context 7 (position 6) by 4 + 2 = 6 < 7
