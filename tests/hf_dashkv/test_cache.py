import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.cache_utils import DynamicSlidingWindowLayer

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, handoff, with_cache
from hf_dashkv.cache import DashKVLayer
from hf_dashkv.selectors import DenseSelector, HashSelector, QuestSelector
from tests.tiny import CONFIGS, tiny_model

ENCODER_CONFIG = EncoderConfig(bits=32, query_hidden=0)
POLICY = DecodePolicy(budget=4, sink_tokens=1, recent_tokens=2)


def make_cache(name="llama-gqa", policy=POLICY):
    model_config = CONFIGS[name]()
    return DashKVCache(model_config, HashEncoders.random(model_config, ENCODER_CONFIG, dense_layers=(0,)), policy)


def take_pending(keys):
    """What an attention call given ``keys`` and no hand-off keyword would take (the thread-local hand-off)."""
    return handoff.take(keys, {})


def fill(layer, batch=2, tokens=(5, 1, 1), seed=0):
    """Append chunks of random K/V to ``layer``; returns all K/V appended, [B, 2, N, 16]."""
    g = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for t in tokens:
        k, v = torch.randn(batch, 2, t, 16, generator=g), torch.randn(batch, 2, t, 16, generator=g)
        layer.store(k, v)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 2), torch.cat(vs, 2)


def test_layers_follow_the_layout():
    cache = make_cache()
    assert [type(layer) for layer in cache.layers] == [DashKVLayer] * 4
    assert [layer.hashed for layer in cache.layers] == [False, True, True, True]
    assert cache.get_seq_length() == 0


def test_added_memory_is_the_codes_only():
    cache = make_cache()
    assert cache.added_bytes_per_token() == 3 * 2 * 4  # hashed layers x KV heads x bits/8
    fill(cache.layers[1], batch=1, tokens=(10,))
    assert cache.layers[1].key_codes.element_size() * cache.layers[1].key_codes[0, :, 0].numel() == 2 * 4


def test_update_stores_every_token_and_hashes_keys_once():
    cache = make_cache()
    layer = cache.layers[1]
    k, v = fill(layer, tokens=(300, 1, 1))  # grows past the first capacity
    assert layer.get_seq_length() == cache.get_seq_length(1) == 302
    assert layer.get_mask_sizes(1) == (303, 0)
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert torch.equal(layer.key_codes, cache.encoders[1].encode_keys(k))
    dense = cache.layers[0]
    fill(dense)
    assert dense.key_codes is None and dense.get_seq_length() == 7


def test_crop_rolls_back_keys_values_and_codes():
    layer = make_cache().layers[1]
    k, _ = fill(layer)
    layer.crop(-2)
    assert layer.get_seq_length() == 5
    assert torch.equal(layer.keys, k[:, :, :5]) and layer.key_codes.shape[2] == 5
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)


def test_batch_operations_act_on_codes_too():
    layer = make_cache().layers[2]
    k, _ = fill(layer, batch=2)
    codes = layer.key_codes.clone()
    layer.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(layer.keys, k[[1, 1]]) and torch.equal(layer.key_codes, codes[[1, 1]])
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.keys.shape[0] == 1 and layer.key_codes.shape[0] == 1
    layer.batch_repeat_interleave(3)
    assert torch.equal(layer.key_codes, codes[[1, 1, 1]])
    layer.store(torch.zeros(3, 2, 1, 16), torch.zeros(3, 2, 1, 16))  # still appendable after a batch change
    assert layer.get_seq_length() == 8


def test_reset_empties_the_layer():
    cache = make_cache()
    fill(cache.layers[1])
    cache.reset()
    assert cache.get_seq_length(1) == 0 and cache.layers[1].key_codes is None


def test_sliding_layers_keep_transformers_behaviour():
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    cache = DashKVCache(config, HashEncoders.random(config, EncoderConfig(bits=16, query_hidden=0)))
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer) and cache.layers[0].sliding_window == 8
    assert isinstance(cache.layers[1], DashKVLayer) and cache.layers[1].hashed


def test_missing_or_wrong_encoders_are_refused():
    with pytest.raises(ValueError, match="it needs encoders"):
        DashKVCache(CONFIGS["llama-gqa"](), policy=POLICY)
    with pytest.raises(ValueError, match="num_kv_heads"):
        DashKVCache(CONFIGS["llama-mha"](), HashEncoders.random(CONFIGS["llama-gqa"](), ENCODER_CONFIG), POLICY)
    with pytest.raises(TypeError, match="takes a DecodePolicy"):
        DashKVCache(CONFIGS["llama-gqa"](), HashEncoders.random(CONFIGS["llama-gqa"](), ENCODER_CONFIG), {"budget": 4})
    all_dense = DecodePolicy(dense_layers=(0, 1, 2, 3))
    encoders = HashEncoders.random(CONFIGS["llama-gqa"](), ENCODER_CONFIG)
    assert DashKVCache(CONFIGS["llama-gqa"](), encoders, all_dense).layout.hashed_layers == ()
    dense = DashKVCache(CONFIGS["llama-gqa"](), selector=DenseSelector())  # full attention needs no encoders
    assert dense.layout.hashed_layers == () and not any(layer.sparse for layer in dense.layers)


@pytest.mark.parametrize("hashed", [(1,), (1, 2, 3)])
def test_a_model_without_dashkv_attention_warns_once_with_the_fix(hashed):
    import warnings

    from tests.tiny import tiny_model

    model = tiny_model(attn_implementation="sdpa")
    dense = tuple(i for i in range(4) if i not in hashed)
    encoders = HashEncoders.random(model.config, ENCODER_CONFIG, dense_layers=dense)
    cache = DashKVCache(model.config, encoders, DecodePolicy(budget=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(input_ids=torch.ones(1, 30, dtype=torch.long), max_new_tokens=4, do_sample=False,
                       **with_cache(cache))
    mine = [w for w in caught if "does not read it" in str(w.message)]
    assert len(mine) == 1 and "attn_implementation='dashkv'" in str(mine[0].message)
    take_pending(cache.layers[hashed[-1]].keys)


def test_memory_after_a_prompt_and_decode_steps_stays_close_to_the_tokens_stored():
    layer = make_cache().layers[1]
    fill(layer, batch=1, tokens=(20_000,) + (1,) * 100)
    capacity = {name: buf.shape[2] for name, buf in layer._buffers.items()}
    assert all(c == capacity["keys"] for c in capacity.values())
    assert 20_100 <= capacity["keys"] <= 1.02 * 20_100  # doubling would hold 40,000


@pytest.mark.parametrize("trained_on, warnings_expected", [("other keys", 1), ("these keys", 0), ("neutral", 0)])
def test_encoders_trained_on_other_keys_are_noticed_at_the_prompt(trained_on, warnings_expected):
    import warnings

    cache = make_cache()
    keys = torch.randn(1, 2, 40, 16) * 3
    observed = keys.norm(dim=-1).mean(dim=(0, 2))
    # neutral (all ones): random encoders, or trained before the scale was recorded: nothing to compare with
    scale = {"other keys": observed * 10, "these keys": observed, "neutral": torch.ones(2)}[trained_on]
    cache.layers[1].encoders.key.input_scale.copy_(scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.layers[1].store(keys, keys)
    assert sum("not those the encoders were trained on" in str(w.message) for w in caught) == warnings_expected


def test_beam_reorder_keeps_the_buffers_in_place():
    layer = make_cache().layers[1]
    k, _ = fill(layer, batch=3, tokens=(50, 1))
    before = {name: (buf.data_ptr(), buf.shape) for name, buf in layer._buffers.items()}
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert {name: (buf.data_ptr(), buf.shape) for name, buf in layer._buffers.items()} == before
    assert torch.equal(layer.keys, k[[2, 0, 0]])


def test_update_hands_the_layer_to_the_next_attention_call_once_and_store_does_not():
    layer = make_cache().layers[1]
    keys, _ = layer.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
    assert take_pending(torch.zeros(1)) is None  # attention given other keys finds nothing
    assert take_pending(keys) is layer and take_pending(keys) is None
    layer.store(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    assert take_pending(layer.keys) is None and layer.get_seq_length() == 4


def test_fork_continues_exactly_and_rehashes_for_other_encoders():
    model_config = CONFIGS["llama-gqa"]()
    cache = make_cache()
    keys, values = fill(cache.layers[1], batch=1, tokens=(7,))
    other = HashEncoders.random(model_config, ENCODER_CONFIG, dense_layers=(0,), seed=5)
    same, rehashed = cache.fork(cache.encoders, POLICY), cache.fork(other, POLICY)
    assert take_pending(cache.layers[1].keys) is None  # forking hands nothing to an attention call
    for fork, encoders in ((same, cache.encoders), (rehashed, other)):
        layer = fork.layers[1]
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert torch.equal(layer.key_codes, encoders[1].encode_keys(keys))
    assert not torch.equal(same.layers[1].key_codes, rehashed.layers[1].key_codes)
    k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    same.layers[1].update(k, v)  # the fork grows on its own; the original keeps its 7 tokens
    assert same.get_seq_length(1) == 8 and cache.get_seq_length(1) == 7


def test_fork_to_a_baseline_needs_no_encoders():
    cache = make_cache()
    fill(cache.layers[1], batch=1, tokens=(6,))
    fork = cache.fork(None, POLICY, QuestSelector())
    assert fork.encoders is None and fork.layers[1].key_codes is None and fork.get_seq_length(1) == 6
    assert isinstance(fork.layers[1].selector, QuestSelector) and fork.policy == POLICY


def test_a_fork_keeps_the_policy_unless_given_another():
    model = tiny_model("llama-gqa")
    encoders = HashEncoders.random(model.config, EncoderConfig(bits=32, query_hidden=0))
    cache = DashKVCache(model.config, encoders, DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4))
    assert cache.fork(encoders).policy == cache.policy
    assert cache.fork(encoders, DecodePolicy(budget=8)).policy.budget == 8


def test_a_hash_selector_is_not_a_baseline():
    model = tiny_model("llama-gqa")
    encoders = HashEncoders.random(model.config, EncoderConfig(bits=32, query_hidden=0))
    with pytest.raises(ValueError, match="hash selectors are made per layer from the encoders"):
        DashKVCache(model.config, encoders, selector=HashSelector(encoders[1]))
