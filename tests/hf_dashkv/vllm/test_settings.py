"""Tensor parallelism by KV head (``settings.rank_kv_heads`` + ``LayerEncoders.shard``), pure PyTorch.

vLLM gives tensor-parallel rank ``r`` of ``tp`` the KV heads ``[r * Hkv / tp, (r + 1) * Hkv / tp)`` and their query
heads (``LlamaAttention``, ``Qwen2Attention``: ``num_kv_heads // tp`` per rank); each rank's attention only sees its
heads. Here each rank runs the paged reference on its heads with its shard of the encoders, and must give the head
slice of the whole model's run. End to end, ``test_vllm_e2e.py`` runs 2 ranks as vLLM's CPU worker processes (tokens
equal to the single process's); a run on several GPUs needs a GPU attention backend, which the plugin does not have.
"""

import pytest
import torch
from transformers import LlamaConfig

from hf_dashkv import DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.vllm.paged import PagedLayer, paged_decode
from hf_dashkv.vllm.settings import rank_kv_heads
from tests.hf_dashkv.test_encoders import trained_looking
from tests.tiny import TINY

KV_HEADS, GROUP, DIM, BLOCK = 6, 2, 16, 8


@pytest.mark.parametrize("tp, expected", [
    (1, [range(6)]), (2, [range(3), range(3, 6)]), (3, [range(2), range(2, 4), range(4, 6)]),
    (6, [range(i, i + 1) for i in range(6)]),
])
def test_each_rank_holds_consecutive_kv_heads_as_vllm_splits_them(tp, expected):
    assert [rank_kv_heads(KV_HEADS, tp, rank) for rank in range(tp)] == expected


def test_more_ranks_than_kv_heads_is_refused_since_no_rank_would_hold_a_whole_group():
    # vLLM would replicate each of 2 KV heads on 2 of 4 ranks, each with half of its query heads: a rank could only
    # select for half a group, not as the whole model does
    with pytest.raises(ValueError, match=r"each GQA group's query heads on one rank.*tensor_parallel_size <= 2"):
        rank_kv_heads(2, 4, 0)
    with pytest.raises(ValueError, match="does not divide"):
        rank_kv_heads(6, 4, 0)


@pytest.mark.parametrize("policy", [
    DecodePolicy(budget=5, sink_tokens=2, recent_tokens=4),
    DecodePolicy(budget=4, sink_tokens=1, recent_tokens=3, rerank=2, group_reduce="min"),
], ids=["codes", "rerank-min"])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_each_rank_selects_for_its_heads_what_the_whole_model_selects_for_them(tp, policy):
    config = LlamaConfig(**{**TINY, "hidden_size": 192, "num_attention_heads": 12}, num_key_value_heads=KV_HEADS)
    layer = trained_looking(HashEncoders.random(config, EncoderConfig(bits=32, query_hidden=8), seed=1), seed=2)[1]
    g = torch.Generator().manual_seed(tp)
    num_blocks, seq_lens = 24, torch.tensor([37, 20, 50], dtype=torch.int32)
    key, value = (torch.randn(num_blocks, KV_HEADS, BLOCK, DIM, generator=g) for _ in range(2))
    table = torch.randperm(num_blocks, generator=g)[:21].view(3, 7).int()  # each request's blocks, shuffled
    query = torch.randn(3, KV_HEADS * GROUP, DIM, generator=g)
    whole = PagedLayer(key, value, layer.encode_keys(key))  # [blocks, Hkv, block, D] read as [B, Hkv, T, D]
    out, selections = paged_decode(query, layer.encode_query(query), whole, table, seq_lens, policy, 0.25)
    assert all(s is not None for s in selections)  # every request selects: the comparison covers selection
    for rank in range(tp):
        heads = rank_kv_heads(KV_HEADS, tp, rank)
        shard, kv, q = layer.shard(heads), slice(heads.start, heads.stop), slice(GROUP * heads.start, GROUP * heads.stop)
        # what the rank's attention sees and writes: its K/V heads, the codes its shard gives their keys
        mine = PagedLayer(key[:, kv], value[:, kv], shard.encode_keys(key[:, kv]))
        rank_out, rank_selections = paged_decode(query[:, q], shard.encode_query(query[:, q]), mine, table, seq_lens,
                                                 policy, 0.25)
        torch.testing.assert_close(rank_out, out[:, q], rtol=0, atol=1e-6)
        for theirs, ours in zip(selections, rank_selections):
            assert torch.equal(ours.rows, theirs.rows[:, kv]) and torch.equal(ours.valid, theirs.valid[:, kv])
