"""Generation paths with a budget far below the context, so the sparse path runs: the fused CPU kernel against the
PyTorch definition of the same step (``selection.select`` then ``exact.attend_rows``), same rows and same outputs."""

import pytest
import torch

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, triton_kernels, with_cache
from tests.tiny import AllSelections, assert_decodes_as_replayed, assert_same_run, logged_generate, tiny_model

ENCODER_CONFIG = EncoderConfig(bits=32, query_hidden=8)
SMALL = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4)


def prompt(batch=2, length=48, pad=(0, 7), repeat=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=g)
    if repeat:  # repeats, so prompt lookup proposes drafts
        ids[:, 30:40] = ids[:, 5:15]
    mask = torch.ones_like(ids)
    for b, p in enumerate(pad[:batch]):
        ids[b, :p], mask[b, :p] = 0, 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


def generate(model, inputs, cache, **kwargs):
    return logged_generate(model, cache, inputs, max_new_tokens=8, **kwargs)


def fresh_cache(model, policy=SMALL, backend="auto"):
    """A cache whose hashed layers (1-3) decode sparsely: ``backend="auto"`` is the fused CPU kernel for fp32 and bf16,
    ``"torch"`` the PyTorch definition."""
    encoders = HashEncoders.random(model.config, ENCODER_CONFIG, dense_layers=(0,), seed=0)
    return DashKVCache(model.config, encoders, policy, backend=backend)


def backends(cache):
    return {layer.backend.name for layer in cache.layers if layer.sparse}


GENERATIONS = {
    "greedy, batch 2, left padding": (dict(), dict(do_sample=False)),
    "beam search (reorder_cache)": (dict(), dict(do_sample=False, num_beams=3)),
    "sampling": (dict(), dict(do_sample=True, top_k=20)),
    "assisted decoding (crop)": (dict(batch=1, repeat=True), dict(do_sample=False, prompt_lookup_num_tokens=4)),
}


@pytest.mark.parametrize("name", sorted(GENERATIONS))
def test_generation_with_a_small_budget_equals_the_pytorch_definition(name):
    prompt_args, generate_args = GENERATIONS[name]
    model, inputs = tiny_model("llama-gqa"), prompt(**prompt_args)
    cache, definition = fresh_cache(model), fresh_cache(model, backend="torch")
    fused = generate(model, inputs, cache, **generate_args)
    assert_same_run(fused, generate(model, inputs, definition, **generate_args))
    assert backends(cache) == {"numba"} and backends(definition) == {"torch"}


def test_peft_lora_with_a_small_budget_equals_the_pytorch_definition():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(12)
    model = get_peft_model(tiny_model("llama-gqa"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False)).eval()
    cache = fresh_cache(model)
    fused = generate(model, prompt(), cache)
    assert_same_run(fused, generate(model, prompt(), fresh_cache(model, backend="torch")))
    assert backends(cache) == {"numba"}


def test_crop_then_continue_and_reuse_after_reset():
    model, inputs = tiny_model("llama-gqa"), prompt(batch=1)

    def crop_continue_reset(backend):
        cache = fresh_cache(model, backend=backend)
        first = generate(model, inputs, cache)
        cache.crop(-3)
        kept = first[0].sequences[:, : cache.get_seq_length() + 1]  # the cache holds all but the last token
        continued = generate(model, dict(input_ids=kept, attention_mask=torch.ones_like(kept)), cache)
        cache.reset()
        again = generate(model, inputs, cache)
        assert backends(cache) == {backend}  # chosen at the first store, kept through crop and reset
        return first, continued, again

    fused = crop_continue_reset("numba")
    assert torch.equal(fused[2][0].sequences, fused[0][0].sequences)  # a reset cache is as good as a new one
    for mine, reference in zip(fused, crop_continue_reset("torch")):
        assert_same_run(mine, reference)
    assert fused[1][1][0][1] == fused[0][0].sequences.shape[1] - 3  # continued from the cropped length


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_decode_sparsely_as_the_definition_does(dtype):
    # one decode step: later steps and layers may part ways by a rounding that flips a code bit
    model, inputs = tiny_model("llama-gqa").to(dtype), prompt()

    def first_step(backend):
        cache = fresh_cache(model, backend=backend)
        with torch.no_grad():
            model(**inputs, **with_cache(cache))
            with cache.observing(AllSelections()) as log:
                logits = model(input_ids=torch.tensor([[5], [6]]), attention_mask=torch.ones(2, 49, dtype=torch.long),
                               **with_cache(cache)).logits
        assert cache.layers[1].keys.dtype == dtype
        compiled = "numba" if dtype == torch.bfloat16 else "triton" if triton_kernels.interpreting() else "torch"
        assert backends(cache) == {compiled if backend == "auto" else backend}
        return logits.float(), log.steps

    logits, steps = first_step("auto")
    ref_logits, ref_steps = first_step("torch")
    assert steps[0] == ref_steps[0] and steps[0][0] == 1  # the first hashed layer sees the same inputs: same rows
    assert sum(len(r) for r in steps[0][2][0]) < 2 * 49  # sparse
    torch.testing.assert_close(logits, ref_logits, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("where", ["right", "middle"])
def test_padding_other_than_left_is_refused_by_numba_with_the_fix_and_decoded_by_the_torch_backend(where):
    model, inputs = tiny_model("llama-gqa"), prompt(pad=(0, 0))
    holes = slice(41, 48) if where == "right" else slice(10, 17)
    inputs["input_ids"][1, holes], inputs["attention_mask"][1, holes] = 0, 0
    with pytest.raises(ValueError, match=r"numba backend takes left padding only.*padding_side = 'left'.*"
                                         r"backend='torch'"):
        generate(model, inputs, fresh_cache(model, backend="numba"), do_sample=False)
    with pytest.raises(ValueError, match=r"numba backend takes left padding only"):  # what "auto" chose on the CPU
        generate(model, inputs, fresh_cache(model), do_sample=False)
    cache = fresh_cache(model, backend="torch")
    steps = assert_decodes_as_replayed(model, cache, inputs, max_new_tokens=4, do_sample=False)
    assert all(not set(range(holes.start, holes.stop)) & set(rows[1][h]) for _, _, rows in steps for h in range(2))


def test_a_key_masked_after_the_prompt_is_noticed_by_the_cpu_kernel_not_attended():
    # the padding is read over the whole cache once per prompt; a later step that masks its own new key (padding
    # after the tokens) must not go through the left-padding kernel as if it were real
    model = tiny_model("llama-gqa")
    encoders = HashEncoders.random(model.config, EncoderConfig(bits=32, query_hidden=0), dense_layers=(0,))
    cache = DashKVCache(model.config, encoders, DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4),
                        backend="numba")
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 42, dtype=torch.long)
    with torch.no_grad():
        model(ids, attention_mask=mask[:, :40], **with_cache(cache))
        model(ids[:, :1], attention_mask=mask[:, :41], **with_cache(cache))  # a real token: the kernel runs
        mask[1, 41] = 0
        with pytest.raises(ValueError, match="left padding only.*padding_side = 'left'.*backend='torch'"):
            model(ids[:, :1], attention_mask=mask, **with_cache(cache))
