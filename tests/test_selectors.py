"""Baseline selectors through the same cache, selection and attention path as DASH-KV."""

import pytest
import torch
from transformers import DynamicCache

from hf_dashkv import DashKVCache, DashKVConfig, HashEncoders, with_cache
from hf_dashkv.selectors import DecodeStep, HashSelector, RerankSelector, build_selector
from tests.test_tiers import decode_inputs
from tests.tiny import assert_decodes_as_replayed, tiny_model


def hand_made(n=24, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 2, dim, generator=g)  # two query heads sharing one KV head
    key = torch.randn(1, 1, n, dim, generator=g)
    return query, key


def step(query, key):
    return DecodeStep(query.unsqueeze(2), key, key, None, None, 0.5, layer_idx=1)


def chosen(config, query, key):
    selection = build_selector(config, None).select(step(query, key))
    return set(selection.rows[0, 0][selection.valid[0, 0]].tolist())


def test_oracle_picks_the_true_top_mass():
    query, key = hand_made()
    config = DashKVConfig(selector="oracle", budget=5, sink_tokens=1, recent_tokens=2)
    probs = torch.softmax(query[0] @ key[0, 0].T * 0.5, -1).sum(0)  # group mass per key, head_dim 4
    candidates = list(range(1, 22))
    best = sorted(candidates, key=lambda j: -float(probs[j]))[:5]
    assert chosen(config, query, key) == {0, 22, 23} | set(best)


def test_streaming_picks_exactly_sinks_and_recent():
    query, key = hand_made()
    config = DashKVConfig(selector="streaming", budget=5, sink_tokens=3, recent_tokens=4)
    assert chosen(config, query, key) == {0, 1, 2, 20, 21, 22, 23}
    assert config.exact_tokens(24) == 7


def test_quest_page_bound_is_an_upper_bound_and_selects_whole_pages():
    query, key = hand_made(n=32)
    config = DashKVConfig(selector="quest", budget=8, sink_tokens=0, recent_tokens=1, page_size=4)
    bound = -build_selector(config, None).scores(step(query, key))[0, 0]  # [N], each token's page bound
    exact = (query[0] @ key[0, 0].T).sum(0)  # group-summed q . k
    assert torch.all(bound >= exact - 1e-5)
    picked = sorted(chosen(config, query, key) - {31})
    pages = {p // 4 for p in picked}
    assert len(picked) == 8 and len(pages) == 2 and all(sum(p // 4 == page for p in picked) == 4 for page in pages)
    assert pages == set(torch.topk(bound[::4][:7], 2).indices.tolist())  # the best two pages (page 7 holds recent)


@pytest.mark.parametrize("selector", ["oracle", "quest", "streaming"])
def test_baselines_need_no_encoders_and_are_exact_with_a_covering_budget(selector):
    sdpa, dash = tiny_model("llama-gqa", "sdpa"), tiny_model("llama-gqa", "dashkv")
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    covering = DashKVConfig(selector=selector, budget=10_000, sink_tokens=4, recent_tokens=40, dense_layers=(0,))
    ref = sdpa.generate(**with_cache(DynamicCache(config=sdpa.config)), **kwargs)
    assert torch.equal(dash.generate(**with_cache(DashKVCache(dash.config, config=covering)), **kwargs), ref)

    small = DashKVConfig(selector=selector, budget=4, sink_tokens=2, recent_tokens=4, dense_layers=(0,))
    cache = DashKVCache(dash.config, config=small)
    steps = assert_decodes_as_replayed(dash, cache, dict(input_ids=ids), max_new_tokens=8, do_sample=False)
    assert cache.added_bytes_per_token() == 0
    assert {len(rows[0][0]) for _, _, rows in steps} == {2 + 4 + (0 if selector == "streaming" else 4)}


def test_rerank_picks_the_budget_by_exact_scores_among_what_the_codes_shortlist():
    with pytest.raises(ValueError, match="rerank=0"):
        DashKVConfig(rerank=0)
    with pytest.raises(ValueError, match="selector='hash'"):
        DashKVConfig(rerank=2, selector="oracle")
    config = DashKVConfig(bits=32, budget=4, sink_tokens=2, recent_tokens=4, query_hidden=0, rerank=3)
    layer = HashEncoders.random(tiny_model().config, config, seed=0)[1]
    query, key, value = decode_inputs(n=60, seed=4)
    step = DecodeStep(query, key, value, layer.encode_keys(key), None, 0.25, layer_idx=1)
    selector = build_selector(config, layer)
    assert isinstance(selector, RerankSelector)
    chosen = selector.select(step)
    shortlist = HashSelector(DashKVConfig(bits=32, budget=12, sink_tokens=2, recent_tokens=4, query_hidden=0),
                             layer).select(step).mask(60)
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
    config = DashKVConfig(bits=32, budget=4, sink_tokens=2, recent_tokens=4, query_hidden=0, dense_layers=(0,),
                          rerank=2)
    cache = DashKVCache(dash.config, HashEncoders.random(dash.config, config), config)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    steps = assert_decodes_as_replayed(dash, cache, dict(input_ids=ids), max_new_tokens=4, do_sample=False)
    assert {layer for layer, _, _ in steps} == {1, 2, 3}
    assert {len(rows[0][0]) for _, _, rows in steps} == {2 + 4 + 4}


@pytest.mark.parametrize("budget", [5, 0.1])
def test_the_compiled_rerank_gives_the_pytorch_definitions_selection_and_output(monkeypatch, budget):
    from hf_dashkv import kernels
    from hf_dashkv.selectors import Selector

    config = DashKVConfig(bits=32, budget=budget, sink_tokens=2, recent_tokens=4, query_hidden=0, rerank=3)
    layer = HashEncoders.random(tiny_model().config, config, seed=2)[1]
    query, key, value = decode_inputs(batch=2, n=80, seed=5)
    valid = torch.arange(80) >= torch.tensor([[0], [7]])  # left padding in the second row
    step = DecodeStep(query, key, value, layer.encode_keys(key), valid, 0.25, layer_idx=1)
    selector = build_selector(config, layer)
    fast, (out, fused) = selector.select(step), selector.decode(step)  # compiled shortlist; the fused kernel
    monkeypatch.setattr(kernels, "supports", lambda codes: False)
    reference = selector.select(step)
    ref_out, _ = Selector.decode(selector, step)  # rerank scores in PyTorch, select, attend_rows
    for chosen in (fast, fused):
        assert torch.equal(chosen.valid, reference.valid)
        assert torch.equal(chosen.rows[chosen.valid], reference.rows[reference.valid])
    torch.testing.assert_close(out, ref_out)

