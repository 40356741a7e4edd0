"""The offline evaluation suite, built with an offline byte tokenizer (one token per byte: lengths are exact)."""

import pytest

from hf_dashkv.corpora import hotpotqa_paragraphs, stdlib_files
from hf_dashkv.apps.evaluation.metrics import METRICS
from hf_dashkv.apps.evaluation.suite import TASKS, build_suite, needle_single

from tests.tiny import byte_tokenizer

LENGTH = 2048


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def suite(tokenizer):
    return build_suite(tokenizer, [LENGTH], samples=2, seed=0)


def test_every_task_fits_its_length_and_is_deterministic(tokenizer, suite):
    assert sorted({s.task for s in suite}) == sorted(TASKS)
    for sample in suite:
        tokens = len(tokenizer(sample.prompt).input_ids)
        assert 0.85 * LENGTH <= tokens <= LENGTH + 16, (sample.key, tokens)
        assert sample.metric is None or sample.metric in METRICS
    again = build_suite(tokenizer, [LENGTH], samples=2, seed=0)
    assert [s.prompt for s in again] == [s.prompt for s in suite]
    other = build_suite(tokenizer, [LENGTH], samples=2, seed=1, tasks=["needle_single"])
    assert other[0].prompt != suite[[s.task for s in suite].index("needle_single")].prompt


def test_more_samples_keep_the_prompts_of_fewer(tokenizer):
    # resuming with a larger --samples reuses the smaller run's records, so its prompts must come out unchanged
    # (at 4096 tokens hotpotqa draws filler paragraphs: shared with the sampling, they shifted with the count)
    fewer, more = (build_suite(tokenizer, [4096], samples=n, seed=0) for n in (2, 3))
    for task in TASKS:
        assert [(s.key, s.prompt) for s in more if s.task == task][:2] == [
            (s.key, s.prompt) for s in fewer if s.task == task], task


def test_the_answer_is_in_the_context(suite):
    for sample in suite:
        if sample.task in ("squad_qa", "hotpotqa", "needle_single", "needle_multikey", "needle_multivalue",
                           "variable_tracking"):
            assert all(answer in sample.prompt for answer in sample.answers[:1]), sample.key
        if sample.task.startswith("needle") or sample.task == "variable_tracking":
            assert all(answer in sample.prompt for answer in sample.answers), sample.key


def test_needles_sit_at_the_requested_depth(tokenizer):
    for sample in needle_single(tokenizer, 8192, samples=4):
        position = sample.prompt.index(sample.answers[0]) / len(sample.prompt)
        assert abs(position - sample.meta["depth"]) < 0.06, sample.key


def test_evaluation_side_only(suite):
    train_titles = set(hotpotqa_paragraphs("train"))
    for sample in (s for s in suite if s.task == "hotpotqa"):
        assert all(title not in train_titles for title in sample.meta["supporting"])
    eval_files = {p.name for p in stdlib_files("eval")}
    assert all(s.sample_id.split(":")[0] in eval_files for s in suite if s.task == "code_completion")


def test_references_filled_by_the_runner_or_continuations(suite):
    summary = [s for s in suite if s.task == "summary"]
    assert summary and all(s.answers == [] and s.metric == "rouge_score" for s in summary)
    for sample in (s for s in suite if s.task == "perplexity"):
        assert sample.max_new_tokens == 0 and sample.continuation and sample.metric is None


def test_unknown_task_is_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown offline task"):
        build_suite(tokenizer, [LENGTH], samples=1, tasks=["needle"])
