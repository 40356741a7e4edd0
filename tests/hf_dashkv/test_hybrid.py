"""Hybrid sliding/global models (Gemma 3 layout): DASH-KV on the global layers only, sliding layers untouched."""

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig
from transformers.cache_utils import DynamicSlidingWindowLayer

from hf_dashkv import DashKVCache, DashKVLayer, DecodePolicy, EncoderConfig, HashEncoders, with_cache
from tests.tiny import SelectionLog, assert_same_run, logged_generate

# MQA, head_dim 32, its own query scaling (query_pre_attn_scalar) and q/k norms; window 16 < the 60-token prompt
CONFIG = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=1, head_dim=32, sliding_window=16, query_pre_attn_scalar=24, max_position_embeddings=512,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
)


def gemma3(impl):
    torch.manual_seed(0)
    return Gemma3ForCausalLM._from_config(Gemma3TextConfig(**CONFIG), attn_implementation=impl).eval()


def inputs():
    ids = torch.randint(3, 97, (2, 60), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)


def cache_for(model, bits, policy):
    encoders = HashEncoders.random(model.config, EncoderConfig(bits=bits, query_hidden=0), policy.dense_layers)
    return DashKVCache(model.config, encoders, policy)


def test_covering_budget_equals_sdpa_greedy_and_beam():
    sdpa, dash = gemma3("sdpa"), gemma3("dashkv")
    covering = DecodePolicy(budget=10_000)
    for extra in ({}, {"num_beams": 3}):
        ref = sdpa.generate(**with_cache(DynamicCache(config=sdpa.config)), **inputs(), **extra)
        assert torch.equal(dash.generate(**with_cache(cache_for(dash, 32, covering)), **inputs(), **extra), ref)


def test_small_budget_hashes_global_layers_only_and_leaves_sliding_layers_as_they_were():
    dash = gemma3("dashkv")
    small = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4)
    cache = cache_for(dash, 32, small)
    assert [i for i, layer in enumerate(cache.layers) if isinstance(layer, DynamicSlidingWindowLayer)] == [0, 1, 3, 4]
    assert cache.layout.hashed_layers == (2, 5) and sorted(int(i) for i in cache.encoders.layers) == [2, 5]
    reference = DynamicCache(config=dash.config)
    with torch.no_grad(), cache.observing(SelectionLog()) as log:
        ids = inputs()["input_ids"][:1]
        for cache_ in (cache, reference):
            dash(ids, **with_cache(cache_))
            dash(ids[:, -1:], **with_cache(cache_))  # one decode step
    assert all(isinstance(cache.layers[i], DashKVLayer) for i in (2, 5)) and sorted(log.last) == [2, 5]
    # the sliding layers hold exactly what transformers' own sliding layers hold (layer 0 sees identical inputs)
    assert torch.equal(cache.layers[0].keys, reference.layers[0].keys)
    assert cache.layers[0].keys.shape[2] == reference.layers[0].keys.shape[2] < 61
    assert cache.get_seq_length() == 61


def test_small_budget_hybrid_generation_equals_the_pytorch_definition():
    dash = gemma3("dashkv")
    small = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4)
    encoders = HashEncoders.random(dash.config, EncoderConfig(bits=32, query_hidden=0))

    def run(backend):
        return logged_generate(dash, DashKVCache(dash.config, encoders, small, backend=backend), {}, **inputs())

    fused = run("auto")
    assert_same_run(fused, run("torch"))
    assert {layer for layer, _, _ in fused[1]} == {2, 5}


@pytest.mark.slow
def test_real_gemma3_is_exact_past_its_sliding_window_and_hashes_only_global_layers(gemma3_270m):
    from hf_dashkv.apps.demo import passkey_prompt

    model, tokenizer = gemma3_270m
    tokenizer.padding_side = "left"
    texts = [passkey_prompt(tokenizer, 700).text, passkey_prompt(tokenizer, 600, passkey="90210").text]
    batch = tokenizer(texts, return_tensors="pt", padding=True)  # both longer than the 512-token window
    kwargs = dict(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    covering = DecodePolicy(budget=10_000)
    for extra in ({}, {"num_beams": 3}):
        model.set_attn_implementation("sdpa")
        try:
            ref = model.generate(**with_cache(DynamicCache(config=model.config)), **kwargs, **extra)
        finally:
            model.set_attn_implementation("dashkv")
        assert torch.equal(model.generate(**with_cache(cache_for(model, 64, covering)), **kwargs, **extra), ref)
    assert "71432" in tokenizer.decode(ref[0, batch.input_ids.shape[1]:])

    small = DecodePolicy(budget=32, sink_tokens=4, recent_tokens=32)
    cache = cache_for(model, 64, small)
    with cache.observing(SelectionLog()) as log:
        model.generate(**with_cache(cache), **kwargs)
    assert sorted(log.last) == [5, 11, 17]
    assert all(isinstance(cache.layers[i], DynamicSlidingWindowLayer) for i in range(18) if i not in (5, 11, 17))


@pytest.mark.slow
def test_shipped_gemma3_encoders_fit_its_global_layers(gemma3_270m):
    from hf_dashkv.embedded import shipped_encoders

    model, _ = gemma3_270m
    encoders = HashEncoders.from_pretrained(str(shipped_encoders("gemma3-270m")))
    encoders.check_compatible(model.config)
    assert encoders.layout.hashed_layers == (5, 11, 17) and encoders.config.bits == 256
