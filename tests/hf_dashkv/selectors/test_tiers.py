"""Tier 2 (approximate logits from the codes) and the decode path the learned terms take."""

from dataclasses import replace

import pytest
import torch

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, kernels, with_cache
from hf_dashkv.backends import TorchBackend
from hf_dashkv.codes import pack_signs, unpack_bits
from hf_dashkv.exact import attend_rows, attend_tiers
from hf_dashkv.selection import Selection
from hf_dashkv.selectors import HashSelector, Tier2Selector, hash_selector
from hf_dashkv.step import DecodeStep
from hf_dashkv.selectors.tiers import tier2_features, tier2_logits
from tests.hf_dashkv.test_generate import prompt
from tests.tiny import CONFIGS, assert_same_generation, decode_and_replay, tiny_model

ENCODERS = EncoderConfig(bits=32, query_hidden=0)
SMALL = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, dense_layers=(0,))


def decode_inputs(batch=1, kv_heads=2, group=2, n=40, dim=16, seed=0):
    """A decode step's q/k/v and random encoders for the tiny GQA Llama's shape (2 KV heads, 4 query heads)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=g)
    key, value = torch.randn(2, batch, kv_heads, n, dim, generator=g)
    return query, key, value


def random_layer(seed=0):
    return HashEncoders.random(CONFIGS["llama-gqa"](), ENCODERS, seed=seed)[1]


def test_tier2_attention_is_one_softmax_over_exact_and_approximate_logits():
    query, key, value = decode_inputs(kv_heads=1, n=12)
    rows, ok = torch.tensor([[[0, 5, 11, 3]]]), torch.tensor([[[True, True, True, False]]])
    rows2, ok2 = torch.tensor([[[7, 2, 0]]]), torch.tensor([[[True, True, False]]])
    logits2 = torch.tensor([[[[0.5, -1.0, 9.0], [2.0, 0.0, 9.0]]]])  # [B, Hkv, G, M2]; the last slot is unused
    out = attend_tiers(query, key, value, Selection(rows, ok), Selection(rows2, ok2), logits2, 0.3)
    for h in range(2):
        exact = [float(query[0, h, 0] @ key[0, 0, r]) * 0.3 for r in (0, 5, 11)]
        weights = torch.softmax(torch.tensor(exact + logits2[0, 0, h, :2].tolist()), -1)
        expected = weights @ value[0, 0, [0, 5, 11, 7, 2]]
        torch.testing.assert_close(out[0, 0, h], expected)


def test_the_tier2_logit_is_the_scaled_hash_inner_product_plus_the_query_norm_term():
    query, _, _ = decode_inputs(kv_heads=1, n=3)
    g = torch.Generator().manual_seed(1)
    query_codes = pack_signs(torch.randn(1, 1, 2, 32, generator=g))
    row_codes = pack_signs(torch.randn(1, 1, 3, 32, generator=g))
    weight = torch.tensor([[3.0, -1.0, 0.5], [1.0, 2.0, -0.25]])
    logits = tier2_logits(tier2_features(query, query_codes, row_codes), weight)
    q_signs, k_signs = (unpack_bits(c[0, 0]).float() * 2 - 1 for c in (query_codes, row_codes))
    for h in range(2):
        for m in range(3):
            inner = float(q_signs[h] @ k_signs[m]) / 32  # the hash inner product in +-1 space, in [-1, 1]
            expected = weight[h, 0] * inner + weight[h, 1] + weight[h, 2] * query[0, h, 0].norm()
            assert abs(float(logits[0, 0, h, m] - expected)) < 1e-5


def test_tier2_rows_are_the_next_nearest_and_disjoint_from_tier1():
    policy = DecodePolicy(budget=6, sink_tokens=2, recent_tokens=3, tier2_budget=5)
    layer = random_layer()
    layer.tier2.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).repeat(4, 1))
    query, key, value = decode_inputs(batch=2, n=50, seed=2)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :9] = False
    step = DecodeStep(query, key, value, layer.encode_keys(key), valid, 0.25, layer_idx=1)
    tiers = Tier2Selector(HashSelector(layer)).plan(step, policy).tiers(step)
    assert tiers.tier2.rows.shape == (2, 2, 5) and tiers.tier2.valid.all()
    tier1, tier2 = tiers.tier1.mask(50), tiers.tier2.mask(50)
    assert not (tier1 & tier2).any()
    assert not tier2[1, :, :11].any() and not tier2[:, :, 47:].any()  # candidates only: no padding, sinks, recent
    # together they are the 11 nearest candidates
    wider = DecodePolicy(budget=11, sink_tokens=2, recent_tokens=3)
    assert torch.equal(tier1 | tier2, HashSelector(layer).plan(step, wider).select(step).mask(50))


def test_tier2_decode_attends_both_tiers_with_the_fitted_logit():
    policy = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, tier2_budget=6)
    layer = random_layer()
    layer.tier2.weight.copy_(torch.tensor([4.0, -0.5, 0.1]).repeat(4, 1))
    query, key, value = decode_inputs()
    step = DecodeStep(query, key, value, layer.encode_keys(key), None, 0.25, layer_idx=1)
    selector = hash_selector(policy, layer)
    assert isinstance(selector, Tier2Selector)
    tiers = selector.plan(step, policy).tiers(step)
    plain = HashSelector(layer).plan(step, policy).select(step)
    assert torch.equal(tiers.tier1.rows, plain.rows) and torch.equal(tiers.tier1.valid, plain.valid)  # tier 1: plain
    assert tiers.tier2.rows.shape == (1, 2, 6)
    logits2 = tier2_logits(tiers.features, layer.tier2.weight)
    expected = attend_tiers(query, key, value, tiers.tier1, tiers.tier2, logits2, 0.25)
    torch.testing.assert_close(tiers.output, expected)
    torch.testing.assert_close(TorchBackend().run(selector.plan(step, policy), step)[0], expected)
    assert not torch.allclose(tiers.output, attend_rows(query, key, value, tiers.tier1, 0.25))


def test_unfitted_tier2_is_refused_with_the_fix_named():
    model_config = CONFIGS["llama-gqa"]()
    policy = DecodePolicy(budget=4, dense_layers=(0,), tier2_budget=4)
    with pytest.raises(ValueError, match=r"tier-2 logit terms of layers \[1, 2, 3\] were never fitted.*fit-terms"):
        DashKVCache(model_config, HashEncoders.random(model_config, ENCODERS, (0,)), policy)


def test_with_every_learned_term_off_the_fused_kernel_runs_and_nothing_else(monkeypatch):
    calls = []
    fused = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch definition runs only when a learned term is on")

    monkeypatch.setattr(TorchBackend, "run", refuse)
    model = tiny_model("llama-gqa")
    cache = DashKVCache(model.config, HashEncoders.random(model.config, ENCODERS, SMALL.dense_layers), SMALL)
    model.generate(**prompt(), max_new_tokens=4, do_sample=False, pad_token_id=0, **with_cache(cache))
    assert len(calls) == 3 * 3  # hashed layers x decode steps (the first new token comes from prefill)
    assert {cache.layers[i].backend.name for i in (1, 2, 3)} == {"numba"}


FLAGS = {
    "tier2": dict(tier2_budget=3),
    "spatial": dict(spatial_calibration=True),
    "temporal": dict(temporal_calibration=True),
    "all": dict(tier2_budget=0.1, spatial_calibration=True, temporal_calibration=True),
}


@pytest.mark.parametrize("flags", sorted(FLAGS))
def test_greedy_generation_with_each_learned_term_attends_what_it_selected(flags, monkeypatch):
    policy = replace(SMALL, **FLAGS[flags])
    model = tiny_model("llama-gqa")
    encoders = HashEncoders.random(model.config, ENCODERS, policy.dense_layers)
    steps = []
    pytorch_definition = TorchBackend.run
    monkeypatch.setattr(TorchBackend, "run", lambda *a, **k: steps.append(1) or pytorch_definition(*a, **k))

    def decode(tier2_bias):
        for i in encoders.layout.hashed_layers:
            encoders[i].tier2.weight.copy_(torch.tensor([2.0, tier2_bias, 0.1]).repeat(4, 1))
            encoders[i].calibration.spatial.fill_(1.5)
            encoders[i].calibration.temporal.fill_(3.0)
        steps.clear()
        return decode_and_replay(model, DashKVCache(model.config, encoders, policy), prompt(), max_new_tokens=5,
                                 do_sample=False)

    # the replay attends tier 1's rows exactly: what decoding with tier 1 alone gives
    run, replayed, logged = decode(tier2_bias=-1e4 if policy.tier2_budget else 0.0)
    assert len(steps) == 3 * 4  # the PyTorch path, not the fused kernel
    assert {len(rows[1][0]) for _, _, rows in logged} == {2 + 4 + 4}  # the padded row has 7 fewer candidates
    assert_same_generation(run, replayed)
    if policy.tier2_budget:  # with logits that count, tier 2's rows take attention the tier-1 replay does not have
        run, replayed, _ = decode(tier2_bias=0.0)
        assert (torch.stack(run.scores) - torch.stack(replayed.scores)).abs().max() > 1e-2
