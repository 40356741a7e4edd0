"""The "dashkv-train" attention: capture of q/k/v, and sparse attention as a decode step selects."""

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_dashkv import DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.capture import TRAIN_IMPLEMENTATION, Capture, capture_attention, selection_mask
from hf_dashkv.exact import attend_rows
from hf_dashkv.selectors import HashSelector
from hf_dashkv.step import DecodeStep
from tests.tiny import tiny_model


def test_capture_records_post_rope_attention_inputs_and_stops_after_the_last_layer_needed():
    model, reference = tiny_model("llama-gqa"), tiny_model("llama-gqa", "sdpa")
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    captured = capture_attention(model, ids, last_layer=1)
    assert sorted(captured) == [0, 1] and model.config._attn_implementation == "dashkv"  # restored
    query, key, value, scaling = captured[1]
    assert query.shape == (1, 4, 20, 16) and key.shape == value.shape == (1, 2, 20, 16) and scaling == 16**-0.5
    reference.set_attn_implementation(TRAIN_IMPLEMENTATION)
    with torch.no_grad():
        out = reference(ids, use_cache=False, dashkv_capture=Capture(until=99)).logits  # never stops: all layers
        reference.set_attn_implementation("sdpa")
        assert torch.equal(out, reference(ids, use_cache=False).logits)  # capturing changes no output
    assert torch.equal(capture_attention(reference, ids, 3)[1][1], key)  # the same weights, the same keys


def test_dashkv_train_attention_is_exact_and_ignores_unselected_keys():
    model, reference = tiny_model("llama-gqa", TRAIN_IMPLEMENTATION), tiny_model("llama-gqa", "sdpa")
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))

    def random_encoders():
        return HashEncoders.random(model.config, EncoderConfig(bits=16, query_hidden=0), dense_layers=(0,))

    def logits(budget):
        policy = DecodePolicy(budget=budget, sink_tokens=2, recent_tokens=8, dense_layers=(0,))
        with torch.no_grad():
            return model(input_ids=ids, dashkv_sparse=(random_encoders(), policy)).logits

    expected = reference(input_ids=ids).logits
    assert torch.equal(logits(64), expected)  # a budget covering every key: plain causal sdpa
    assert not torch.allclose(logits(4), expected)

    # with a small budget, each position attends exactly to the rows a decode step selects, and to nothing else
    policy = DecodePolicy(budget=0.125, sink_tokens=2, recent_tokens=8, dense_layers=(0,))
    encoders = random_encoders()
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, heads, 64, 16, generator=generator) for heads in (4, 2, 2))
    attention = ALL_ATTENTION_FUNCTIONS[TRAIN_IMPLEMENTATION]
    layer = model.model.layers[1].self_attn
    out, _ = attention(layer, query, key, value, None, scaling=0.25, dashkv_sparse=(encoders, policy))
    key_codes = encoders[1].encode_keys(key)
    selector = HashSelector(encoders[1])
    for t in range(policy.sink_tokens + policy.recent_tokens + policy.budget_tokens(64), 64):  # selection drops keys
        step = DecodeStep(query[:, :, t : t + 1], key[:, :, : t + 1], value[:, :, : t + 1], key_codes[:, :, : t + 1],
                          None, 0.25, layer_idx=1)
        torch.testing.assert_close(out[:, t], attend_rows(step.query, step.key, step.value,
                                                          selector.plan(step, policy).select(step),
                                                          0.25)[:, 0])
    keep = selection_mask(encoders[1], policy, query, key)
    dropped = int((~keep[0, 0, 63]).nonzero()[0])
    poisoned = value.clone()
    poisoned[0, 0, dropped] = 1e4
    out_poisoned, _ = attention(layer, query, key, poisoned, None, scaling=0.25, dashkv_sparse=(encoders, policy))
    assert torch.equal(out_poisoned[0, 63], out[0, 63])
    assert not torch.equal(out_poisoned[0, dropped], out[0, dropped])  # where the row is attended, it shows
