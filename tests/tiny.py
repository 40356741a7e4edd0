"""Tiny random models built from configs in the tests: fast; Llama, Qwen2, Qwen3 (q/k norms), Mistral, GQA, MHA."""

import contextlib

import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

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
    # q/k RMS norms before RoPE: the cache, and so the encoders, see the normed, rotated keys
    "qwen3-gqa": lambda: Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16),
}


def tiny_model(name: str = "llama-gqa", attn_implementation: str = "dashkv", seed: int = 0, **overrides):
    """A randomly initialised 4-layer model of the family ``name`` (see CONFIGS, changed by ``overrides``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def byte_tokenizer():
    """A tokenizer built offline: one token per byte (ids 1-256) plus a BOS (id 0) that it adds to every text.

    Token counts and cut points are then known exactly, and any model with ``vocab_size >= 257`` can read it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={"<s>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")


class SelectionLog:
    """An observer for ``DashKVCache.observing``: the last selection of each layer, ``{layer_idx: Selection}``."""

    def __init__(self):
        self.last = {}

    def __call__(self, step, selection):
        self.last[step.layer_idx] = selection


class AllSelections:
    """An observer keeping every selection of a run, in order: ``[(layer, N, selected rows per (batch, KV head))]``."""

    def __init__(self):
        self.steps = []

    def __call__(self, step, selection):
        rows = [[selection.rows[b, h][selection.valid[b, h]].tolist() for h in range(selection.rows.shape[1])]
                for b in range(selection.rows.shape[0])]
        self.steps.append((step.layer_idx, step.key.shape[2], rows))


SMALL_POLICY = dict(budget=4, sink_tokens=2, recent_tokens=4)  # far below the tiny prompts: decoding drops rows


def sparse_generation_setup(batch: int = 2, prompt: int = 60, seed: int = 0):
    """``(model, input_ids [batch, prompt], make_cache)``: a tiny GQA model whose hashed layers (1-3) decode with a
    budget far below the prompt, so generation runs the sparse path; ``make_cache(backend="auto")`` (the compiled
    kernel on the CPU; ``"torch"``: the PyTorch definition)."""
    from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders

    model = tiny_model("llama-gqa", seed=seed)
    encoders = HashEncoders.random(model.config, EncoderConfig(bits=32, query_hidden=0), dense_layers=(0,), seed=seed)
    policy = DecodePolicy(**SMALL_POLICY)
    ids = torch.randint(1, 97, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    return model, ids, lambda backend="auto": DashKVCache(model.config, encoders, policy, backend=backend)


@contextlib.contextmanager
def replaying(model, steps: list):
    """Within the block, ``model`` (loaded with a plain attention) decodes each hashed layer's step as SDPA over all
    its keys, masked to the rows logged for that step (``AllSelections.steps``) (and to the padding mask): the definition
    of sparse attention, independent of the selection and the kernels that made the rows. Prompt forwards, and
    layers without logged rows, run plain SDPA. A step that does not line up with the log fails the test."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    queues = {}
    for layer, length, rows in steps:
        queues.setdefault(layer, []).append((length, rows))

    def replay(module, query, key, value, attention_mask, **kwargs):
        queue = queues.get(module.layer_idx)
        if query.shape[2] != 1 or not queue:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        length, rows = queue.pop(0)
        assert key.shape[2] == length, f"layer {module.layer_idx}: {key.shape[2]} keys, the logged step had {length}"
        allowed = torch.zeros(key.shape[0], key.shape[1], 1, length, dtype=torch.bool)
        for b, per_head in enumerate(rows):
            for h, picked in enumerate(per_head):
                allowed[b, h, 0, picked] = True
        mask = allowed.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        if attention_mask is not None:
            mask = mask & attention_mask[..., -length:]
        return sdpa_attention_forward(module, query, key, value, mask, **{**kwargs, "is_causal": False})

    AttentionInterface.register("dashkv_replay", replay)
    AttentionMaskInterface.register("dashkv_replay", sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("dashkv_replay")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
    assert not any(queues.values()), "the reference run made fewer decode steps than the logged one"


def generate_scored(model, cache, inputs: dict, **generate_kwargs):
    """``model.generate`` with ``cache``, scores returned, sampling seeded (7): two calls are comparable."""
    from hf_dashkv import with_cache

    torch.manual_seed(7)
    return model.generate(**inputs, **with_cache(cache), **{"pad_token_id": 0, **generate_kwargs},
                          output_scores=True, return_dict_in_generate=True)


def logged_generate(model, cache, inputs: dict, **generate_kwargs) -> tuple:
    """``(output, steps)``: :func:`generate_scored` with ``cache``, and every selection it made (``AllSelections``)."""
    with cache.observing(AllSelections()) as log:
        out = generate_scored(model, cache, inputs, **generate_kwargs)
    return out, log.steps


def assert_same_generation(run, reference) -> None:
    """Two :func:`generate_scored` outputs: the same tokens, scores within 1e-4."""
    assert torch.equal(run.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(run.scores), torch.stack(reference.scores), atol=1e-4, rtol=1e-4)


def assert_same_run(run, reference) -> None:
    """Two :func:`logged_generate` results: the same selections, some of which dropped rows (so the comparison
    covered sparse decoding), and the same generation."""
    (out, steps), (ref_out, ref_steps) = run, reference
    assert steps == ref_steps
    assert any(sum(len(r) for r in rows[0]) < len(rows[0]) * n for _, n, rows in steps), "nothing was dropped"
    assert_same_generation(out, ref_out)


def decode_and_replay(model, cache, inputs: dict, **generate_kwargs):
    """``(run, replayed, steps)``: :func:`logged_generate` with ``cache``, then again with a plain cache under
    ``replaying`` its steps."""
    from transformers import DynamicCache

    run, steps = logged_generate(model, cache, inputs, **generate_kwargs)
    with replaying(model, steps):
        replayed = generate_scored(model, DynamicCache(config=model.config), inputs, **generate_kwargs)
    return run, replayed, steps


def assert_decodes_as_replayed(model, cache, inputs: dict, **generate_kwargs) -> list:
    """``decode_and_replay``: the same tokens and scores, and some step dropped rows. Returns the logged steps."""
    run, replayed, steps = decode_and_replay(model, cache, inputs, **generate_kwargs)
    assert any(sum(len(r) for r in rows[0]) < len(rows[0]) * n for _, n, rows in steps), "nothing was dropped"
    assert_same_generation(run, replayed)
    return steps
