import pytest
from transformers import Gemma2Config, Gemma3TextConfig, GptOssConfig, LlamaConfig, MistralConfig

from hf_dashkv import ModelLayout
from tests.tiny import CONFIGS


def test_llama_layout_places_dense_layers():
    layout = ModelLayout.from_model_config(CONFIGS["llama-gqa"](), dense_layers=(0, -1))
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (4, 4, 2, 16)
    assert layout.group_size == 2
    assert layout.hashed_layers == (1, 2) and layout.dense_layers == (0, 3)


def test_layers_without_encoders_go_dense():
    layout = ModelLayout.from_model_config(CONFIGS["llama-gqa"](), dense_layers=(0,)).hashing_only((1, 3))
    assert layout.hashed_layers == (1, 3) and layout.dense_layers == (0, 2)


def test_hybrid_model_hashes_global_layers_only_and_names_sliding_ones():
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=["sliding_attention"] * 2
        + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
    )
    layout = ModelLayout.from_model_config(config)
    assert layout.hashed_layers == (2, 5)
    assert layout.sliding_layers == (0, 1, 3, 4)
    with pytest.raises(ValueError, match=r"sliding-window layers \[1\].*sliding layers are \[0, 1, 3, 4\]"):
        ModelLayout.from_model_config(config, dense_layers=(1,))


def test_unsupported_models_say_what_is_supported():
    softcapped = Gemma2Config(num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"soft-caps attention logits.*Supported: decoder-only"):
        ModelLayout.from_model_config(softcapped)
    learned_sinks = GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
    )
    with pytest.raises(ValueError, match=r"learned sink logits \(s_aux\).*Supported: decoder-only"):
        ModelLayout.from_model_config(learned_sinks)
    uneven = LlamaConfig(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=4, hidden_size=96)
    with pytest.raises(ValueError, match="do not split evenly"):
        ModelLayout.from_model_config(uneven)


def test_dense_layer_out_of_range():
    with pytest.raises(ValueError, match="outside this model's 4 layers"):
        ModelLayout.from_model_config(CONFIGS["llama-gqa"](), dense_layers=(4,))


def test_a_model_wide_sliding_window_is_refused_with_the_way_out():
    windowed = MistralConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=4096
    )
    with pytest.raises(ValueError, match=r"Every layer .* sliding-window \(sliding_window=4096\).*sliding_window = None"):
        ModelLayout.from_model_config(windowed)
    windowed.sliding_window = None
    assert ModelLayout.from_model_config(windowed).hashed_layers == (0, 1)
