"""Baseline selectors through the same cache, selection and attention path as DASH-KV."""

import pytest
import torch
from transformers import DynamicCache

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, with_cache
from hf_dashkv.backends import NumbaBackend, TorchBackend
from hf_dashkv.plans import RerankPlan
from hf_dashkv.selectors import (DenseSelector, HashSelector, OracleSelector, QuestSelector, StreamingSelector,
                                 hash_selector)
from hf_dashkv.step import DecodeStep
from tests.tiny import assert_decodes_as_replayed, tiny_model

ENCODER_CONFIG = EncoderConfig(bits=32, query_hidden=0)
BASELINES = {"oracle": OracleSelector, "quest": QuestSelector, "streaming": StreamingSelector}


def decode_inputs(batch=1, kv_heads=2, group=2, n=40, dim=16, seed=0):
    """A decode step's q/k/v for the tiny GQA Llama's shape (2 KV heads, 4 query heads)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=g)
    key, value = torch.randn(2, batch, kv_heads, n, dim, generator=g)
    return query, key, value


def hand_made(n=24, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 2, dim, generator=g)  # two query heads sharing one KV head
    key = torch.randn(1, 1, n, dim, generator=g)
    return query, key


def step(query, key):
    return DecodeStep(query.unsqueeze(2), key, key, None, None, 0.5, layer_idx=1)


def chosen(selector, policy, query, key):
    the_step = step(query, key)
    selection = selector.plan(the_step, policy).select(the_step)
    return set(selection.rows[0, 0][selection.valid[0, 0]].tolist())


def test_oracle_picks_the_true_top_mass():
    query, key = hand_made()
    policy = DecodePolicy(budget=5, sink_tokens=1, recent_tokens=2)
    probs = torch.softmax(query[0] @ key[0, 0].T * 0.5, -1).sum(0)  # group mass per key, head_dim 4
    candidates = list(range(1, 22))
    best = sorted(candidates, key=lambda j: -float(probs[j]))[:5]
    assert chosen(OracleSelector(), policy, query, key) == {0, 22, 23} | set(best)


def test_streaming_picks_exactly_sinks_and_recent():
    query, key = hand_made()
    policy = DecodePolicy(budget=5, sink_tokens=3, recent_tokens=4)
    assert chosen(StreamingSelector(), policy, query, key) == {0, 1, 2, 20, 21, 22, 23}
    assert StreamingSelector().budget(policy, 24) == 0  # 7 exact tokens, whatever the budget
    assert StreamingSelector().covers(policy, 7) and not StreamingSelector().covers(policy, 8)


def test_quest_page_bound_is_an_upper_bound_and_selects_whole_pages():
    query, key = hand_made(n=32)
    policy, quest = DecodePolicy(budget=8, sink_tokens=0, recent_tokens=1), QuestSelector(page_size=4)
    bound = -quest.scores(step(query, key), policy)[0, 0]  # [N], each token's page bound
    exact = (query[0] @ key[0, 0].T).sum(0)  # group-summed q . k
    assert torch.all(bound >= exact - 1e-5)
    picked = sorted(chosen(quest, policy, query, key) - {31})
    pages = {p // 4 for p in picked}
    assert len(picked) == 8 and len(pages) == 2 and all(sum(p // 4 == page for p in picked) == 4 for page in pages)
    assert pages == set(torch.topk(bound[::4][:7], 2).indices.tolist())  # the best two pages (page 7 holds recent)


@pytest.mark.parametrize("selector", ["oracle", "quest", "streaming"])
def test_baselines_need_no_encoders_and_are_exact_with_a_covering_budget(selector):
    sdpa, dash = tiny_model("llama-gqa", "sdpa"), tiny_model("llama-gqa", "dashkv")
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    covering = DecodePolicy(budget=10_000, sink_tokens=4, recent_tokens=40, dense_layers=(0,))
    ref = sdpa.generate(**with_cache(DynamicCache(config=sdpa.config)), **kwargs)
    covered = DashKVCache(dash.config, policy=covering, selector=BASELINES[selector]())
    assert torch.equal(dash.generate(**with_cache(covered), **kwargs), ref)

    small = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, dense_layers=(0,))
    cache = DashKVCache(dash.config, policy=small, selector=BASELINES[selector]())
    steps = assert_decodes_as_replayed(dash, cache, dict(input_ids=ids), max_new_tokens=8, do_sample=False)
    assert cache.added_bytes_per_token() == 0
    assert {len(rows[0][0]) for _, _, rows in steps} == {2 + 4 + (0 if selector == "streaming" else 4)}


def test_rerank_picks_the_budget_by_exact_scores_among_what_the_codes_shortlist():
    with pytest.raises(ValueError, match="rerank=0"):
        DecodePolicy(rerank=0)
    with pytest.raises(ValueError, match=r"OracleSelector has no hash codes.*rerank=2"):
        DashKVCache(tiny_model().config, policy=DecodePolicy(rerank=2), selector=OracleSelector())
    policy = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, rerank=3)
    layer = HashEncoders.random(tiny_model().config, ENCODER_CONFIG, seed=0)[1]
    query, key, value = decode_inputs(n=60, seed=4)
    step = DecodeStep(query, key, value, layer.encode_keys(key), None, 0.25, layer_idx=1)
    selector = hash_selector(policy, layer)
    plan = selector.plan(step, policy)
    assert type(selector) is HashSelector and selector.plan_type(policy) is RerankPlan
    assert isinstance(plan, RerankPlan) and plan.shortlist == 12 and plan.budget == 4
    chosen = plan.select(step)
    shortlisting = DecodePolicy(budget=12, sink_tokens=2, recent_tokens=4)
    shortlist = HashSelector(layer).plan(step, shortlisting).select(step).mask(60)
    assert (chosen.mask(60) <= shortlist).all() and chosen.valid.sum(-1).eq(2 + 4 + 4).all()
    # among the shortlist, the budget holds the keys of most exact attention (the group's summed softmax)
    for h in range(2):
        rows = [int(r) for r in shortlist[0, h].nonzero() if 2 <= r < 56]
        q = query[0, 2 * h : 2 * h + 2, 0]
        probs = torch.softmax(q @ key[0, h, rows].T * 0.25, -1).sum(0)
        best = {rows[i] for i in probs.topk(4).indices.tolist()}
        assert best == set(chosen.rows[0, h, 6:].tolist())


def test_generation_runs_with_reranking():
    dash = tiny_model("llama-gqa", "dashkv")
    policy = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, dense_layers=(0,), rerank=2)
    cache = DashKVCache(dash.config, HashEncoders.random(dash.config, ENCODER_CONFIG), policy)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    steps = assert_decodes_as_replayed(dash, cache, dict(input_ids=ids), max_new_tokens=4, do_sample=False)
    assert {layer for layer, _, _ in steps} == {1, 2, 3}
    assert {len(rows[0][0]) for _, _, rows in steps} == {2 + 4 + 4}


@pytest.mark.parametrize("budget", [5, 0.1])
def test_the_compiled_rerank_gives_the_pytorch_definitions_selection_and_output(budget):
    policy = DecodePolicy(budget=budget, sink_tokens=2, recent_tokens=4, rerank=3)
    layer = HashEncoders.random(tiny_model().config, ENCODER_CONFIG, seed=2)[1]
    query, key, value = decode_inputs(batch=2, n=80, seed=5)
    valid = torch.arange(80) >= torch.tensor([[0], [7]])  # left padding in the second row
    step = DecodeStep(query, key, value, layer.encode_keys(key), valid, 0.25, layer_idx=1, left_padded=True)
    plan = hash_selector(policy, layer).plan(step, policy)
    assert isinstance(plan, RerankPlan) and NumbaBackend().refusal(RerankPlan, key.device, key.dtype) is None
    out, fused = NumbaBackend().run(plan, step)  # the fused kernel: codes, shortlist, re-ranking, attention
    ref_out, reference = TorchBackend().run(plan, step)  # rerank scores in PyTorch, select, attend_rows
    assert torch.equal(fused.valid, reference.valid)
    assert torch.equal(fused.rows[fused.valid], reference.rows[reference.valid])
    torch.testing.assert_close(out, ref_out)


def test_the_dense_selector_is_full_attention_under_any_policy():
    # the reference a DASH-KV policy is compared with (bench, eval): re-ranking or a tiny budget change nothing
    model = tiny_model("llama-gqa")
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    policy = DecodePolicy(budget=2, sink_tokens=1, recent_tokens=2, rerank=2)
    dense = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                           **with_cache(DashKVCache(model.config, policy=policy, selector=DenseSelector())))
    full = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                          **with_cache(DynamicCache(config=model.config)))
    assert torch.equal(dense.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(dense.scores), torch.stack(full.scores))
