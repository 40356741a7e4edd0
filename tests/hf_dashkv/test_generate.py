"""End to end through model.generate on tiny random models: exact when the budget covers the context."""

import pytest
import torch
from transformers import DynamicCache

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, with_cache
from tests.tiny import CONFIGS, assert_decodes_as_replayed, tiny_model

ENCODER_CONFIG = EncoderConfig(bits=32, query_hidden=8)
COVERING = DecodePolicy(budget=10_000, sink_tokens=2, recent_tokens=4)
SMALL = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4)


def prompt(batch=2, length=40, pad=(0, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pad[:batch]):
        ids[b, :p], mask[b, :p] = 0, 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


def dashkv_cache(model, policy=COVERING):
    encoders = HashEncoders.random(model.config, ENCODER_CONFIG, dense_layers=(0,), seed=0)
    return DashKVCache(model.config, encoders, policy)


def generate_both(name, policy=COVERING, **kwargs):
    """(sdpa + DynamicCache output, dashkv + DashKVCache output) for the same tiny model and inputs."""
    sdpa, dash = tiny_model(name, "sdpa"), tiny_model(name, "dashkv")
    kwargs = dict(max_new_tokens=12, pad_token_id=0, **kwargs)
    torch.manual_seed(7)
    ref = sdpa.generate(**with_cache(DynamicCache(config=sdpa.config)), **kwargs)
    torch.manual_seed(7)
    out = dash.generate(**with_cache(dashkv_cache(dash, policy)), **kwargs)
    return ref, out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_batch_with_left_padding_equals_sdpa(name):
    ref, out = generate_both(name, **prompt(), do_sample=False)
    assert torch.equal(ref, out)


def test_beam_search_equals_sdpa():
    ref, out = generate_both("llama-gqa", **prompt(), do_sample=False, num_beams=3)
    assert torch.equal(ref, out)


def test_sampling_with_a_fixed_seed_equals_sdpa():
    ref, out = generate_both("qwen2-gqa", **prompt(), do_sample=True, top_k=20)
    assert torch.equal(ref, out)


def test_return_dict_in_generate_and_scores():
    ref, out = generate_both(
        "llama-mha", **prompt(batch=1), do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    assert torch.equal(ref.sequences, out.sequences)
    assert isinstance(out.past_key_values, DashKVCache)
    torch.testing.assert_close(torch.stack(ref.scores), torch.stack(out.scores))


def test_assisted_decoding_crops_the_cache():
    inputs = prompt(batch=1)
    inputs["input_ids"][0, 20:30] = inputs["input_ids"][0, 5:15]  # repeats, so prompt lookup proposes drafts
    ref, out = generate_both("llama-gqa", **inputs, do_sample=False, prompt_lookup_num_tokens=4)
    assert torch.equal(ref, out)


def test_use_cache_false_is_exact():
    sdpa, dash = tiny_model("llama-gqa", "sdpa"), tiny_model("llama-gqa", "dashkv")
    inputs = prompt()
    ref = sdpa.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    out = dash.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(ref, out)


def test_peft_lora_model_equals_sdpa():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    models = {}
    for impl in ("sdpa", "dashkv"):
        torch.manual_seed(11)  # same base weights and the same (non-zero) adapter in both
        base = tiny_model("llama-gqa", impl)
        torch.manual_seed(12)
        models[impl] = get_peft_model(base, lora).eval()
    inputs = prompt()
    ref = models["sdpa"].generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = models["dashkv"].generate(
        **inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
        **with_cache(dashkv_cache(models["dashkv"])),
    )
    assert torch.equal(ref, out)


def test_qwen3_hashes_the_normed_rotated_keys_that_attention_scores_use():
    sdpa, dash = tiny_model("qwen3-gqa", "sdpa"), tiny_model("qwen3-gqa", "dashkv")
    inputs = prompt(batch=1)
    reference = DynamicCache(config=sdpa.config)
    cache = dashkv_cache(dash, SMALL)
    with torch.no_grad():
        sdpa(**inputs, **with_cache(reference))
        dash(**inputs, **with_cache(cache))
    for index in cache.layout.hashed_layers:
        keys = reference.layers[index].keys  # after k_norm and RoPE, as sdpa attention receives them
        torch.testing.assert_close(cache.layers[index].keys, keys)
        assert torch.equal(cache.layers[index].key_codes, cache.encoders[index].encode_keys(cache.layers[index].keys))
    assert_decodes_as_replayed(dash, dashkv_cache(dash, SMALL), inputs, max_new_tokens=3, do_sample=False)
