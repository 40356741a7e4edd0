"""LongBench loader on a small fixture in LongBench's JSONL format, with a byte-level tokenizer built offline."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from hf_dashkv.apps.evaluation.longbench import TASKS, LongBenchTask, load_longbench
from hf_dashkv.apps.evaluation.metrics import METRICS, score

from tests.tiny import byte_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"
FIXTURE_TASKS = ["hotpotqa", "gov_report", "trec", "passage_count", "passage_retrieval_en", "lcc"]
BIG = 10**6  # a budget no fixture prompt reaches


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def records(task):
    with open(FIXTURE / f"{task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_fixture_records_have_longbench_fields():
    fields = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
    for task in FIXTURE_TASKS:
        for record in records(task):
            assert set(record) == fields
            assert record["dataset"] == task


def test_task_table_is_longbench_english():
    assert list(TASKS) == [
        "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
        "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
    ]
    assert all(task.metric in METRICS for task in TASKS.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["lcc"].max_new_tokens = 1
    assert isinstance(TASKS["lcc"], LongBenchTask)


def test_templates_filled_exactly(tokenizer):
    samples = {s.sample_id: s for s in load_longbench(FIXTURE, tokenizer, tasks=FIXTURE_TASKS, max_length=BIG)}
    hotpot, trec, lcc = records("hotpotqa")[0], records("trec")[0], records("lcc")[1]
    count = records("passage_count")[0]
    assert samples[hotpot["_id"]].prompt == (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n" + hotpot["context"] + "\n\nAnswer the question based on "
        "the given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
        + hotpot["input"] + "\nAnswer:"
    )
    assert samples[trec["_id"]].prompt == (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        + trec["context"] + "\n" + trec["input"]
    )
    # the context's braces stay as they are; LongBench's template puts no newline between context and instruction
    assert "{" in lcc["context"]
    expected_lcc = "Please complete the code given below. \n" + lcc["context"] + "Next line of code:\n"
    assert samples[lcc["_id"]].prompt == expected_lcc
    assert samples[count["_id"]].prompt.endswith("such as 1, 2, 3, and so on.\n\nThe final answer is: ")
    assert "asconcisely" in TASKS["narrativeqa"].prompt  # LongBench's own typo, kept


def test_sample_fields_come_from_record_and_task_table(tokenizer):
    samples = load_longbench(FIXTURE, tokenizer, tasks=FIXTURE_TASKS, max_length=BIG)
    assert len(samples) == 2 * len(FIXTURE_TASKS)
    expected = {"hotpotqa": (32, "qa_f1_score"), "gov_report": (512, "rouge_score"),
                "trec": (64, "classification_score"), "passage_count": (32, "count_score"),
                "passage_retrieval_en": (32, "retrieval_score"), "lcc": (64, "code_sim_score")}
    for sample, (task, record) in zip(samples, [(t, r) for t in FIXTURE_TASKS for r in records(t)]):
        assert sample.task == f"longbench/{task}"
        assert sample.sample_id == record["_id"]
        assert sample.answers == record["answers"]
        assert sample.all_classes == record["all_classes"]
        assert (sample.max_new_tokens, sample.metric) == expected[task]
        assert sample.context_tokens == BIG
        assert sample.meta == {"length": record["length"], "truncated": False}
    assert samples[4].all_classes is not None  # trec carries its label set


def test_truncation_keeps_head_and_tail_halves(tokenizer):
    full = load_longbench(FIXTURE, tokenizer, tasks="hotpotqa", max_length=BIG)[0].prompt
    assert full.isascii()  # one token per character, after the BOS
    n_tokens = len(full) + 1

    # exactly at the budget: untouched
    (kept,) = load_longbench(FIXTURE, tokenizer, tasks="hotpotqa", max_length=n_tokens, limit=1)
    assert (kept.prompt, kept.meta["truncated"]) == (full, False)

    # 101 -> half = 50: the head's 50 tokens are BOS + 49 characters (BOS decoded away), the tail 50 characters
    (cut,) = load_longbench(FIXTURE, tokenizer, tasks="hotpotqa", max_length=101, limit=1)
    assert cut.prompt == full[:49] + full[-50:]
    assert cut.meta["truncated"] is True
    assert cut.context_tokens == 101
    assert cut.prompt.endswith("\nAnswer:")


def test_perfect_prediction_scores_one_and_a_wrong_one_less(tokenizer):
    for sample in load_longbench(FIXTURE, tokenizer, tasks=FIXTURE_TASKS, max_length=BIG):
        perfect = score(sample.metric, sample.answers[0], sample.answers, sample.all_classes, sample.task)
        wrong = score(sample.metric, "I am not sure.", sample.answers, sample.all_classes, sample.task)
        assert perfect == 1.0, sample.key
        assert wrong < 0.5, sample.key


def test_limit_task_names_and_data_subfolder(tokenizer, tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "data")
    samples = load_longbench(tmp_path, tokenizer, tasks=["longbench/trec", "lcc"], max_length=BIG, limit=1)
    assert [s.task for s in samples] == ["longbench/trec", "longbench/lcc"]
    assert [s.sample_id for s in samples] == [records("trec")[0]["_id"], records("lcc")[0]["_id"]]


def test_missing_folder(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_longbench(tmp_path / "nowhere", tokenizer, tasks=["trec"])


def test_missing_task_file_names_path_and_download(tokenizer):
    with pytest.raises(FileNotFoundError) as err:
        load_longbench(FIXTURE, tokenizer, tasks=["qasper"])
    message = str(err.value)
    assert str(FIXTURE / "qasper.jsonl") in message
    assert "https://huggingface.co/datasets/THUDM/LongBench" in message and "data.zip" in message
    # all tasks by default: the fixture lacks the first one
    with pytest.raises(FileNotFoundError, match="narrativeqa"):
        load_longbench(FIXTURE, tokenizer)


def test_unknown_task_lists_known_ones(tokenizer):
    with pytest.raises(ValueError, match="dureader.*known: narrativeqa, qasper"):
        load_longbench(FIXTURE, tokenizer, tasks=["dureader"])


def test_record_missing_a_template_field(tokenizer, tmp_path):
    record = dict(records("trec")[0])
    del record["input"]
    (tmp_path / "trec.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="input"):
        load_longbench(tmp_path, tokenizer, tasks=["trec"])


def test_max_length_too_small(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        load_longbench(FIXTURE, tokenizer, tasks=["trec"], max_length=1)
