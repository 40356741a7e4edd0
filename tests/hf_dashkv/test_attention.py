import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, handoff
from hf_dashkv.attention import dashkv_attention_forward, key_validity
from tests.hf_dashkv.test_exact import Module, qkv
from tests.tiny import CONFIGS


def test_key_validity_reads_bool_and_additive_masks():
    k = torch.zeros(2, 1, 4, 8)
    bool_mask = torch.tensor([[[[False, True, True, True]]], [[[True, True, True, True]]]])
    assert torch.equal(key_validity(bool_mask, k), bool_mask[:, 0, 0])
    additive = torch.zeros(2, 1, 1, 4).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(key_validity(additive, k), bool_mask[:, 0, 0])
    assert key_validity(None, k) is None


def test_without_a_dashkv_cache_it_is_plain_sdpa():
    q, k, v = qkv()
    out, _ = dashkv_attention_forward(Module(), q, k, v, None, scaling=0.3)
    ref, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.3)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("term", ["s_aux", "position_bias"])
def test_attention_with_extra_logit_terms_is_refused(term):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"adds terms to the logits \({term}\).*Supported: decoder-only"):
        dashkv_attention_forward(Module(), q, k, v, None, **{term: torch.zeros(q.shape[1])})


class DecodeModule(torch.nn.Module):
    """What the attention function reads of an attention module: a tiny Llama GQA layer 1 (4 query heads, 2 KV)."""

    num_key_value_groups = 2
    is_causal = True
    layer_idx = 1


def prefilled_cache(prompt: int = 30):
    """A tiny Llama GQA cache whose layer 1 holds ``prompt`` tokens, stored without a hand-off, and one decode step's
    ``(query, key, value)``; the policy keeps 7 rows, so the step is sparse."""
    model_config = CONFIGS["llama-gqa"]()
    encoders = HashEncoders.random(model_config, EncoderConfig(bits=32, query_hidden=0), seed=0)
    cache = DashKVCache(model_config, encoders, DecodePolicy(budget=4, sink_tokens=1, recent_tokens=2))
    g = torch.Generator().manual_seed(0)
    cache.layers[1].store(torch.randn(1, 2, prompt, 16, generator=g), torch.randn(1, 2, prompt, 16, generator=g))
    query, key, value = (torch.randn(1, heads, 1, 16, generator=g) for heads in (4, 2, 2))
    return cache, (query, key, value)


def waiting_layer():
    return getattr(handoff._waiting, "layer", None)


def test_the_cache_hands_its_layer_to_attention_in_the_kwargs_or_by_tensor_identity(monkeypatch):
    monkeypatch.setattr(handoff._waiting, "layer", None, raising=False)
    scale = 16**-0.5

    # transformers >= 5.25: update receives the attention module's kwargs dict, the layer travels in it
    cache, (q, k, v) = prefilled_cache()
    carried = {}
    k_all, v_all = cache.update(k, v, 1, kwargs=carried)
    assert carried == {handoff.KEYWORD: cache.layers[1]} and waiting_layer() is None
    new_style, _ = dashkv_attention_forward(DecodeModule(), q, k_all, v_all, None, scaling=scale, **carried)
    assert waiting_layer() is None and cache.record.pending is None
    full, _ = sdpa_attention_forward(DecodeModule(), q, k_all, v_all, None, scaling=scale)
    assert not torch.allclose(new_style, full)  # the layer was taken: a sparse step, not plain SDPA
    torch.testing.assert_close(new_style, cache.layers[1].attend(q, None, scale, 1), rtol=0, atol=0)

    # older 5.x: update without kwargs; the layer waits in a thread-local, found by the keys it returned
    cache, (q, k, v) = prefilled_cache()
    k_all, v_all = cache.update(k, v, 1)
    assert waiting_layer() is cache.layers[1]
    _, other_k, other_v = qkv(batch=1, heads=4, kv_heads=2, n=31, d=16, seed=1)
    other, _ = dashkv_attention_forward(DecodeModule(), q, other_k, other_v, None, scaling=scale)
    plain, _ = sdpa_attention_forward(DecodeModule(), q, other_k, other_v, None, scaling=scale)
    assert torch.equal(other, plain)  # attention given other keys finds nothing and stays exact
    assert waiting_layer() is cache.layers[1]  # ... and leaves the hand-off to the call it belongs to
    old_style, _ = dashkv_attention_forward(DecodeModule(), q, k_all, v_all, None, scaling=scale)
    assert waiting_layer() is None and cache.record.pending is None
    assert torch.equal(old_style, new_style)
