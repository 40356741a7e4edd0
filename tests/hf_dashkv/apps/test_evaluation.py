"""`dashkv eval` mechanics on a tiny random Llama: every method from one prefill, fidelity, resume, failures, report."""

import dataclasses
import json
from pathlib import Path

import pytest

from hf_dashkv import DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.apps.evaluation import runner
from hf_dashkv.apps.evaluation.longbench import load_longbench
from hf_dashkv.apps.evaluation.report import (
    agreement_interval, failed_samples, markdown, summarize, token_agreement, write_report,
)
from hf_dashkv.apps.evaluation.runner import METHODS, Evaluator, evaluate, prompt_digest, read_records, setups
from hf_dashkv.selectors import DenseSelector, OracleSelector, QuestSelector, StreamingSelector

from tests.tiny import byte_tokenizer, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"
POLICY = DecodePolicy(budget=8, sink_tokens=2, recent_tokens=4, dense_layers=(0,))


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama-gqa", vocab_size=300)
    encoders = HashEncoders.random(model.config, EncoderConfig(bits=32, query_hidden=0), POLICY.dense_layers, seed=1)
    encoders.policy = POLICY  # stands in for trained encoders and their recommended policy
    return model, byte_tokenizer(), encoders


@pytest.fixture(scope="module")
def samples(tiny):
    """The LongBench fixture, cut to ~300 tokens, answers of 4 tokens (a random model never stops by itself)."""
    tasks = sorted(path.stem for path in FIXTURE.glob("*.jsonl"))
    loaded = load_longbench(FIXTURE, tiny[1], tasks, max_length=300, limit=1)
    return [dataclasses.replace(s, max_new_tokens=4) for s in loaded]


def make_evaluator(tiny, budgets=(8,), methods=METHODS):
    model, tokenizer, encoders = tiny
    return Evaluator(model, tokenizer, setups(model.config, encoders, list(methods), list(budgets)), prefill_chunk=96)


def test_setups_are_full_once_then_each_method_per_budget(tiny):
    model, _, encoders = tiny
    runs = setups(model.config, encoders, list(METHODS), [8, 0.5])
    assert [(s.method, s.budget) for s in runs][:7] == [
        ("full", "-"), ("dashkv", "8"), ("random", "8"), ("streaming", "-"), ("quest", "8"), ("oracle", "8"),
        ("dashkv", "1/2"),
    ]
    assert len(runs) == 1 + 5 + 4  # streaming has no budget, so it runs once
    by_name = {(s.method, s.budget): s for s in runs}
    assert by_name[("dashkv", "8")].encoders is encoders
    assert by_name[("random", "8")].encoders is not encoders and by_name[("quest", "8")].encoders is None
    assert by_name[("random", "8")].encoders.config == encoders.config
    assert by_name[("random", "8")].encoders.layout == encoders.layout
    selectors = {s.method: type(s.selector) for s in runs}
    assert selectors == {"full": DenseSelector, "dashkv": type(None), "random": type(None),
                         "streaming": StreamingSelector, "quest": QuestSelector, "oracle": OracleSelector}
    assert by_name[("full", "-")].policy == POLICY  # full attention whatever the budget: a dense selector
    assert by_name[("dashkv", "1/2")].policy == dataclasses.replace(POLICY, budget=0.5)
    assert by_name[("oracle", "8")].policy == dataclasses.replace(POLICY, budget=8)
    with pytest.raises(ValueError, match="unknown method"):
        setups(model.config, encoders, ["h2o"], [8])


def test_longbench_fixture_end_to_end(tiny, samples, tmp_path):
    evaluator = make_evaluator(tiny)
    records = evaluate(evaluator, samples, tmp_path / "predictions.jsonl")
    assert len(records) == len(samples) * len(evaluator.setups)
    full_steps = {r["key"]: r["steps"] for r in records if r["method"] == "full"}
    for record in records:
        assert record["error"] is None and 0.0 <= record["score"] <= 1.0
        assert record["prompt_tokens"] > (POLICY.sink_tokens + POLICY.recent_tokens + POLICY.budget_tokens(300)) // 2  # long enough that selection drops keys
        steps = full_steps[record["key"]]
        assert record["steps"] == steps > 0  # every method is compared along full's answer, token by token
        if record["method"] == "full":
            assert record["kl"] == 0.0 and record["agreement"] == 1.0 and record["recall"] == {}
        else:
            assert record["kl"] >= 0.0 and 0.0 <= record["agreement"] <= 1.0
            assert (record["agreement"] * steps) == pytest.approx(round(record["agreement"] * steps))
            assert set(record["recall"]) == {"1", "2", "3"}  # the hashed layers; layer 0 is dense
    oracle = [r for r in records if r["method"] == "oracle"]
    streaming = [r for r in records if r["method"] == "streaming"]
    assert sum(v for r in oracle for v in r["recall"].values()) > sum(v for r in streaming for v in r["recall"].values())
    text = write_report(records, tmp_path)
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + len(samples) * len(evaluator.setups)
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "dashkv 8" in text and "longbench/trec" in text


def test_a_covering_budget_makes_every_method_equal_full(tiny, samples, tmp_path):
    records = evaluate(make_evaluator(tiny, budgets=(10**6,), methods=["full", "dashkv", "quest", "oracle"]),
                       samples[:2], tmp_path / "predictions.jsonl")
    full = {r["key"]: r for r in records if r["method"] == "full"}
    for record in records:
        assert record["prediction"] == full[record["key"]]["prediction"]
        assert record["kl"] == pytest.approx(0.0, abs=1e-6) and record["agreement"] == 1.0
        assert record["nll"] == pytest.approx(full[record["key"]]["nll"], abs=1e-5)


def test_resume_skips_finished_samples_and_redoes_only_missing_runs(tiny, samples, tmp_path, monkeypatch):
    path = tmp_path / "predictions.jsonl"
    evaluator = make_evaluator(tiny, methods=["full", "dashkv", "streaming"])
    evaluate(evaluator, samples[:2], path)
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not (json.loads(line)["key"] == samples[1].key
                                           and json.loads(line)["method"] == "dashkv")]
    path.write_text("\n".join(kept) + '\n{"task": "cut short by a ki')  # a killed run leaves a partial line
    calls = []
    original = Evaluator.run_sample

    def counting(self, sample, only=None):
        calls.append((sample.key, only))
        return original(self, sample, only)

    monkeypatch.setattr(Evaluator, "run_sample", counting)
    records = evaluate(evaluator, samples[:2], path)
    assert calls == [(samples[1].key, {("dashkv", "8")})]
    assert len(records) == 2 * 3 and len(read_records(path)) == 2 * 3


def test_a_changed_prompt_under_the_same_key_is_run_again(tiny, samples, tmp_path):
    path = tmp_path / "predictions.jsonl"
    evaluator = make_evaluator(tiny, methods=["full", "streaming"])
    first = evaluate(evaluator, samples[:1], path)
    changed = dataclasses.replace(samples[0], prompt=samples[0].prompt[:-40] + samples[0].prompt[-20:])
    assert changed.key == samples[0].key and prompt_digest(changed) != prompt_digest(samples[0])
    records = evaluate(evaluator, [changed], path)
    assert len(read_records(path)) == 2 * 2  # run again, appended
    assert {r["prompt_sha"] for r in records} == {prompt_digest(changed)} != {r["prompt_sha"] for r in first}
    assert evaluate(evaluator, [changed], path) == records  # and now finished


def test_a_failing_sample_is_recorded_and_the_run_goes_on(tiny, samples, tmp_path, monkeypatch):
    original = Evaluator.run_sample

    def flaky(self, sample, only=None):
        if sample.key == samples[0].key:
            raise RuntimeError("out of memory (simulated)")
        return original(self, sample, only)

    monkeypatch.setattr(Evaluator, "run_sample", flaky)
    evaluator = make_evaluator(tiny, methods=["full", "streaming"])
    records = evaluate(evaluator, samples[:2], tmp_path / "predictions.jsonl")
    failed = [r for r in records if r["error"] is not None]
    assert len(failed) == 1 and "simulated" in failed[0]["error"] and failed[0]["key"] == samples[0].key
    assert len(records) == 1 + 2
    assert failed_samples(records) == [samples[0].key]
    assert f"1 sample(s) failed ({samples[0].key}); the errors" in write_report(records, tmp_path)
    monkeypatch.setattr(Evaluator, "run_sample", original)  # a rerun retries the failed sample
    records = evaluate(evaluator, samples[:2], tmp_path / "predictions.jsonl")
    assert {r["key"] for r in records if r["error"] is None} == {samples[0].key, samples[1].key}
    assert failed_samples(records) == []


def test_summary_ratios_and_perplexity_by_hand():
    def record(task, method, budget, score, nll, recall=None):
        return dict(task=task, context_tokens=4096, sample_id="0", key=f"{task}/0", method=method, budget=budget,
                    score=score, kl=0.1, agreement=0.5, nll=nll, recall=recall or {}, error=None)

    rows = summarize([
        record("qa", "full", "-", 0.8, 1.0), record("qa", "dashkv", "1/32", 0.6, 1.5, {"3": 0.9, "4": 0.7}),
        record("perplexity", "full", "-", None, 2.0), record("perplexity", "dashkv", "1/32", None, 2.5),
    ])
    by = {(r["task"], r["method"]): r for r in rows}
    assert by[("qa", "dashkv")]["ratio_to_full"] == pytest.approx(0.75)
    assert by[("qa", "dashkv")]["recall"] == pytest.approx(0.8)
    assert by[("perplexity", "dashkv")]["perplexity"] == pytest.approx(2.718281828**2.5, rel=1e-6)
    assert by[("perplexity", "full")]["ratio_to_full"] is None


def test_agreement_pooled_over_tokens_by_hand():
    def record(key, agreement, steps, task="qa"):
        return dict(task=task, context_tokens=4096, sample_id=key, key=key, method="dashkv", budget="1/32", score=None,
                    kl=0.1, agreement=agreement, steps=steps, nll=None, recall={}, error=None)

    # a one-token answer missed and a 9-token answer matched: 0.9 per token; a prompt with nothing compared (full
    # attention's record of a prompt without an answer says 1.0) weighs nothing per token
    records = [record("a", 0.0, 1), record("b", 1.0, 9), record("c", None, 0), record("d", 1.0, 0)]
    assert token_agreement(records) == (pytest.approx(0.9), 10)
    (row,) = summarize(records)
    assert row["agreement"] == pytest.approx(2 / 3) and row["token_agreement"] == pytest.approx(0.9)
    assert row["steps"] == 10
    other = summarize([record("e", 0.5, 10, task="summary")])
    assert token_agreement([row, *other], "token_agreement") == (pytest.approx(0.7), 20)
    text = markdown([row, *other])
    assert "| 0.583 | 0.700 |" in text  # task mean (2/3 + 1/2) / 2 against pooled (9 + 5) / 20
    # predictions written before steps were recorded: no pooled number rather than a partial one
    legacy = {k: v for k, v in record("f", 1.0, 3).items() if k != "steps"}
    assert token_agreement([records[1], legacy]) == (None, None)
    assert summarize([legacy])[0]["token_agreement"] is None
    # the bootstrap over prompts: no spread where every prompt agrees alike, a spread around the pooled value else
    assert agreement_interval([record(str(i), 1.0, 5) for i in range(8)]) == (1.0, 1.0)
    spread = [record(str(i), i % 2, 5) for i in range(40)]
    low, high = agreement_interval(spread)
    assert low < token_agreement(spread)[0] == 0.5 < high and high - low < 0.4
    assert agreement_interval([legacy]) is None
    assert "| 0.500 (" in markdown(summarize(spread), intervals={(4096, "dashkv", "1/32"): (low, high)})


def test_runner_methods_match_the_cli_choices():
    from hf_dashkv.apps.cli import build_parser

    args = build_parser().parse_args(["eval", "--budgets", "1/32", "256", "--context", "4k", "8k"])
    assert args.methods == list(runner.METHODS) and args.budgets == [1 / 32, 256] and args.context == [4096, 8192]


def test_setups_take_another_base_config(tiny):
    model, _, encoders = tiny
    base = dataclasses.replace(POLICY, group_reduce="min")
    runs = setups(model.config, encoders, ["full", "dashkv"], [8], base)
    assert {s.policy.group_reduce for s in runs} == {"min"}
    assert [s.policy.group_reduce for s in setups(model.config, encoders, ["full", "dashkv"], [8])] == ["sum", "sum"]


def test_rerank_applies_to_the_hash_methods_only(tiny):
    model, _, encoders = tiny
    runs = setups(model.config, encoders, list(runner.METHODS), [8], rerank=2)
    assert {s.method: s.policy.rerank for s in runs} == {
        "full": 1, "dashkv": 2, "random": 2, "streaming": 1, "quest": 1, "oracle": 1}
    from hf_dashkv.apps.cli import build_parser

    assert build_parser().parse_args(["eval", "--rerank", "2"]).rerank == 2
    # by default the encoders' own decode policy, which shipped encoders may set
    own = dataclasses.replace(POLICY, rerank=3)
    assert {s.method: s.policy.rerank for s in setups(model.config, encoders, ["full", "dashkv", "oracle"], [8], own)} \
        == {"full": 1, "dashkv": 3, "oracle": 1}


def test_a_rerun_with_another_setup_is_refused_and_reports_hold_only_this_run(tiny, samples, tmp_path):
    model, tokenizer, encoders = tiny
    path = tmp_path / "predictions.jsonl"
    first = make_evaluator(tiny, budgets=(8,), methods=["full", "dashkv"])
    evaluate(first, samples[:1], path, facts={"suite_seed": 0})
    with pytest.raises(ValueError, match=r"another setup \(it differs in \['suite_seed'\]\).*another --out-dir"):
        evaluate(first, samples[:1], path, facts={"suite_seed": 1})
    other_encoders = HashEncoders.random(model.config, encoders.config, encoders.layout.dense_layers, seed=5)
    other_encoders.policy = encoders.policy  # retrained: other weights, the same recommended policy
    retrained = Evaluator(model, tokenizer, setups(model.config, other_encoders, ["full", "dashkv"], [8]))
    with pytest.raises(ValueError, match=r"differs in \['dashkv 8'\]"):
        evaluate(retrained, samples[:1], path, facts={"suite_seed": 0})
    min_reduce = dataclasses.replace(encoders.policy, group_reduce="min")
    regrouped = Evaluator(model, tokenizer, setups(model.config, encoders, ["full", "dashkv"], [8], min_reduce))
    with pytest.raises(ValueError, match=r"differs in \['full -', 'dashkv 8'\]"):
        evaluate(regrouped, samples[:1], path, facts={"suite_seed": 0})
    # the same setup with another budget adds to the folder; its report holds this run's budgets only
    records = evaluate(make_evaluator(tiny, budgets=(16,), methods=["full", "dashkv"]), samples[:1], path,
                       facts={"suite_seed": 0})
    assert sorted({(r["method"], r["budget"]) for r in records}) == [("dashkv", "16"), ("full", "-")]


def test_run_identity_records_the_policy_the_selector_and_the_model_name(tiny, monkeypatch):
    model, _, encoders = tiny
    monkeypatch.setattr(model.config, "name_or_path", "/home/someone/models/SmolLM2-135M-Instruct")
    identity = runner.run_identity(make_evaluator(tiny, methods=["full", "dashkv", "quest"]), {"suite_seed": 3})
    assert identity["model"] == "SmolLM2-135M-Instruct" and identity["suite_seed"] == 3  # a name, not a path
    assert "/home/someone" not in json.dumps(identity)
    recorded = identity["setups"]
    assert sorted(recorded) == ["dashkv 8", "full -", "quest 8"]
    assert recorded["dashkv 8"]["policy"] == json.loads(json.dumps(dataclasses.asdict(POLICY)))
    assert recorded["full -"]["selector"] == repr(DenseSelector()) and recorded["full -"]["encoders"] is None
    assert recorded["quest 8"]["selector"] == repr(QuestSelector(page_size=16)) and recorded["quest 8"]["encoders"] is None
    assert recorded["dashkv 8"]["selector"] == repr(None) and recorded["dashkv 8"]["encoders"] is not None
