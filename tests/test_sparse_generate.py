"""Generation paths with a budget far below the context, so the sparse path runs: the fused CPU kernel against the
PyTorch definition of the same step (``selection.select`` then ``exact.attend_rows``), same rows and same outputs."""

import pytest
import torch

from hf_dashkv import DashKVCache, DashKVConfig, HashEncoders, with_cache
from tests.tiny import AllSelections, assert_same_run, logged_generate, tiny_model, use_pytorch_definition

SMALL = DashKVConfig(bits=32, budget=4, sink_tokens=2, recent_tokens=4, query_hidden=8, dense_layers=(0,))


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


def fresh_cache(model, config=SMALL):
    return DashKVCache(model.config, HashEncoders.random(model.config, config, seed=0), config)


GENERATIONS = {
    "greedy, batch 2, left padding": (dict(), dict(do_sample=False)),
    "beam search (reorder_cache)": (dict(), dict(do_sample=False, num_beams=3)),
    "sampling": (dict(), dict(do_sample=True, top_k=20)),
    "assisted decoding (crop)": (dict(batch=1, repeat=True), dict(do_sample=False, prompt_lookup_num_tokens=4)),
}


@pytest.mark.parametrize("name", sorted(GENERATIONS))
def test_generation_with_a_small_budget_equals_the_pytorch_definition(name, monkeypatch):
    prompt_args, generate_args = GENERATIONS[name]
    model, inputs = tiny_model("llama-gqa"), prompt(**prompt_args)
    fused = generate(model, inputs, fresh_cache(model), **generate_args)
    use_pytorch_definition(monkeypatch)
    assert_same_run(fused, generate(model, inputs, fresh_cache(model), **generate_args))


def test_peft_lora_with_a_small_budget_equals_the_pytorch_definition(monkeypatch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(12)
    model = get_peft_model(tiny_model("llama-gqa"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False)).eval()
    fused = generate(model, prompt(), fresh_cache(model))
    use_pytorch_definition(monkeypatch)
    assert_same_run(fused, generate(model, prompt(), fresh_cache(model)))


def test_crop_then_continue_and_reuse_after_reset(monkeypatch):
    model, inputs = tiny_model("llama-gqa"), prompt(batch=1)

    def crop_continue_reset():
        cache = fresh_cache(model)
        first = generate(model, inputs, cache)
        cache.crop(-3)
        kept = first[0].sequences[:, : cache.get_seq_length() + 1]  # the cache holds all but the last token
        continued = generate(model, dict(input_ids=kept, attention_mask=torch.ones_like(kept)), cache)
        cache.reset()
        again = generate(model, inputs, cache)
        return first, continued, again

    fused = crop_continue_reset()
    assert torch.equal(fused[2][0].sequences, fused[0][0].sequences)  # a reset cache is as good as a new one
    use_pytorch_definition(monkeypatch)
    for mine, reference in zip(fused, crop_continue_reset()):
        assert_same_run(mine, reference)
    assert fused[1][1][0][1] == fused[0][0].sequences.shape[1] - 3  # continued from the cropped length


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_decode_sparsely_as_the_definition_does(dtype, monkeypatch):
    # one decode step: later steps and layers may part ways by a rounding that flips a code bit
    model, inputs = tiny_model("llama-gqa").to(dtype), prompt()

    def first_step():
        cache = fresh_cache(model)
        with torch.no_grad():
            model(**inputs, **with_cache(cache))
            with cache.observing(AllSelections()) as log:
                logits = model(input_ids=torch.tensor([[5], [6]]), attention_mask=torch.ones(2, 49, dtype=torch.long),
                               **with_cache(cache)).logits
        assert cache.layers[1].keys.dtype == dtype
        return logits.float(), log.steps

    logits, steps = first_step()
    use_pytorch_definition(monkeypatch)
    ref_logits, ref_steps = first_step()
    assert steps[0] == ref_steps[0] and steps[0][0] == 1  # the first hashed layer sees the same inputs: same rows
    assert sum(len(r) for r in steps[0][2][0]) < 2 * 49  # sparse
    torch.testing.assert_close(logits, ref_logits, atol=0.05, rtol=0.05)
