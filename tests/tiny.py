"""Tiny random models built from configs in the tests: fast, and they cover Llama, Qwen2, Mistral, GQA and MHA."""

import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

import hf_dashkv  # noqa: F401  (registers "dashkv")

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=1024,
)
CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(**TINY, num_key_value_heads=2),
    "llama-mha": lambda: LlamaConfig(**TINY, num_key_value_heads=4),
    "qwen2-gqa": lambda: Qwen2Config(**TINY, num_key_value_heads=2),
    "mistral-gqa": lambda: MistralConfig(**TINY, num_key_value_heads=1, sliding_window=None),
}


def tiny_model(name: str = "llama-gqa", attn_implementation: str = "dashkv", seed: int = 0):
    """A randomly initialised 4-layer model of the family ``name`` (see CONFIGS), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
