"""The document split between training and evaluation text: nothing is on both sides."""

from hf_dashkv import corpora
from lightning_modules.data import read_documents


def test_hotpotqa_split_by_question_then_by_article():
    eval_questions, train_questions = corpora.hotpotqa_questions("eval"), corpora.hotpotqa_questions("train")
    assert len(eval_questions) + len(train_questions) == 7405
    assert 0.08 < len(eval_questions) / 7405 < 0.12
    train, evaluation = corpora.hotpotqa_paragraphs("train"), corpora.hotpotqa_paragraphs("eval")
    assert not set(train) & set(evaluation)
    assert all(title in evaluation for q in eval_questions for title, _ in q["context"])


def test_training_source_reads_only_the_training_side():
    documents = read_documents("hotpotqa")
    assert documents == list(corpora.hotpotqa_paragraphs("train").values())
    assert not set(documents) & set(corpora.hotpotqa_paragraphs("eval").values())


def test_stdlib_split_by_file_and_squad_is_evaluation_only():
    train, evaluation = corpora.stdlib_files("train"), corpora.stdlib_files("eval")
    assert train and evaluation and not set(train) & set(evaluation)
    assert corpora.stdlib_files("eval") == evaluation  # stable
    assert len(corpora.squad_articles()) == 35


def test_bad_side_is_refused():
    import pytest

    with pytest.raises(ValueError, match="'train' or 'eval'"):
        corpora.hotpotqa_questions("test")
