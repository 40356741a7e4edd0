"""The recall probe (`dashkv recall`): R@k|B of trained codes, SimHash and the exact-score ceilings."""

import torch

from hf_dashkv import DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.apps.probe import markdown, probe
from tests.tiny import tiny_model

ENCODER_CONFIG = EncoderConfig(bits=32, query_hidden=0)
POLICY = DecodePolicy(budget=1 / 8, sink_tokens=2, recent_tokens=8, dense_layers=(0,))


def random_encoders(model, seed):
    return HashEncoders.random(model.config, ENCODER_CONFIG, POLICY.dense_layers, seed=seed)


def sequences(count=2, length=160):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (1, length), generator=g) for _ in range(count)]


def test_probe_measures_every_hashed_layer_and_the_ceilings_bound_the_codes():
    model = tiny_model("llama-gqa")
    encoders = random_encoders(model, seed=0)  # the same projections as the probe's SimHash
    table = probe(model, encoders, sequences(), POLICY, queries=8)
    assert sorted(table.values["trained"]) == [1, 2, 3]
    for layer in (1, 2, 3):
        trained, simhash = table.layer("trained", layer), table.layer("simhash", layer)
        assert trained == simhash  # random encoders with seed 0 are the SimHash floor itself
        oracle = table.layer("oracle", layer)
        assert oracle["R@1"] >= trained["R@1"] and oracle["R@8"] >= trained["R@8"] > 0
        assert all(0 <= v <= 1 for v in oracle.values())
    summary = table.summary("oracle")
    assert summary["min layer R@8"] <= summary["R@8"]
    report = markdown(table)
    assert "| trained |" in report and "| oracle |" in report and report.count("\n| 3 |") == 1


def test_a_budget_covering_the_candidates_finds_every_top_key():
    model = tiny_model("llama-gqa")
    covering = DecodePolicy(budget=0.99, sink_tokens=2, recent_tokens=8, dense_layers=(0,))
    table = probe(model, random_encoders(model, seed=3), sequences(1), covering, queries=4)
    for method in ("trained", "simhash", "oracle", "angle"):
        assert table.summary(method)["R@32"] == 1.0


def test_reranking_a_shortlist_of_every_candidate_is_the_oracle():
    model = tiny_model("llama-gqa")
    encoders = random_encoders(model, seed=0)
    table = probe(model, encoders, sequences(1), POLICY, queries=8, methods=("trained", "oracle"), rerank=(2, 1000))
    for layer in (1, 2, 3):
        assert table.layer("rerank1000", layer) == table.layer("oracle", layer)
        assert table.layer("rerank2", layer)["R@8"] >= table.layer("trained", layer)["R@8"] - 0.05
    assert "| rerank2 |" in markdown(table)


def test_the_recall_job_measures_with_the_group_rule_it_is_given(tmp_path):
    from dataclasses import replace

    from hf_dashkv.apps.probe import probe_sequences, run
    from tests.tiny import byte_tokenizer

    model, tokenizer = tiny_model(attn_implementation="sdpa"), byte_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(97 + (i * 7919) % 26) for i in range(2000)))
    encoders = random_encoders(model, seed=1)
    encoders.policy = POLICY  # the recommended policy: its windows are what the job measures with
    tables = run(str(tmp_path / "model"), encoders, [str(text)], [200], 1 / 8, 2, 16, tmp_path / "out",
                 rerank=(), group_reduce="min")
    assert "group min" in (tmp_path / "out" / "results.md").read_text()
    loaded = tiny_model()
    ids = probe_sequences(tokenizer, str(text), 200, 2)
    for rule in ("min", "sum"):
        expected = probe(loaded, encoders, ids, replace(POLICY, group_reduce=rule), 16, methods=("trained",))
        same = expected.summary("trained") == tables[f"{text}, 0k"].summary("trained")  # 200 tokens: "0k"
        assert same == (rule == "min")
