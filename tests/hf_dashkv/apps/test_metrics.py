"""LongBench and RULER metrics on hand-checked examples (expected values worked out in the comments)."""

import pytest

from hf_dashkv.apps.evaluation.metrics import (
    METRICS,
    classification_score,
    code_sim_score,
    count_score,
    edit_similarity,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_score,
    score,
    string_match_all,
    string_match_part,
)


def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces():
    # lower -> "the  cat, a dog & an apple!"; punctuation -> "the  cat a dog  an apple"; articles -> spaces
    assert normalize_answer("The  Cat, a dog & AN apple!") == "cat dog apple"
    # articles only as whole words: "Theater" and "another" stay
    assert normalize_answer("Theater of another age") == "theater of another age"


def test_qa_f1_precision_recall():
    # "eiffel tower in paris" vs "eiffel tower": 2 common tokens, P = 2/4, R = 2/2, F1 = 2PR/(P+R) = 1/1.5 = 2/3
    assert qa_f1_score("The Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)


def test_qa_f1_counts_tokens_with_multiplicity():
    # pred {go: 2, stop: 1}, ref {go: 1, stop: 2}: common = min counts = 1 + 1 = 2, P = R = 2/3, F1 = 2/3
    assert qa_f1_score("go go stop", "go stop stop") == pytest.approx(2 / 3)


def test_qa_f1_normalisation_and_no_overlap():
    # the article and the full stop go: "wexcombe" vs "wexcombe"
    assert qa_f1_score("The Wexcombe.", "wexcombe") == 1.0
    assert qa_f1_score("Larport", "Wexcombe") == 0.0
    assert qa_f1_score("", "Wexcombe") == 0.0


def test_score_keeps_the_best_reference():
    # vs "paris france": 1 common of 4 and 2, P = 1/4, R = 1/2, F1 = (1/4)/(3/4) = 1/3; vs "eiffel tower": 2/3
    assert score("qa_f1_score", "Eiffel Tower in Paris", ["Paris, France", "Eiffel Tower"]) == pytest.approx(2 / 3)
    assert score("qa_f1_score", "Eiffel Tower", []) == 0.0


def test_score_cuts_few_shot_predictions_to_their_first_line():
    prediction = "\n\nParis\nQuestion: What is the capital of Peru?"
    # triviaqa: leading newlines stripped, first line "Paris" -> 1
    assert score("qa_f1_score", prediction, ["Paris"], task="triviaqa") == 1.0
    assert score("qa_f1_score", prediction, ["Paris"], task="longbench/triviaqa") == 1.0
    # other tasks score the whole text: "paris question what is capital of peru", 1 of 7 tokens,
    # P = 1/7, R = 1, F1 = (2/7)/(8/7) = 1/4
    assert score("qa_f1_score", prediction, ["Paris"], task="hotpotqa") == pytest.approx(0.25)
    assert score("qa_f1_score", prediction, ["Paris"]) == pytest.approx(0.25)


def test_score_first_line_rule_for_samsum_rouge():
    prediction = "Anna will bring the cake.\nDialogue: Tom: hi"
    assert score("rouge_score", prediction, ["Anna will bring the cake."], task="samsum") == 1.0
    assert score("rouge_score", prediction, ["Anna will bring the cake."]) < 1.0


CLASSES = ["City", "Country", "Date"]


def test_classification_single_and_several_classes_named():
    assert classification_score("City", "City", CLASSES) == 1.0
    # two classes named, the reference among them -> 1/2
    assert classification_score("Type: City or Country", "City", CLASSES) == 0.5
    assert classification_score("Country", "City", CLASSES) == 0.0


def test_classification_naming_no_class_scores_zero():
    # "Cty" is close to "City", but LongBench's fuzzy fallback is unreachable: nothing named -> 0
    assert classification_score("Cty", "City", CLASSES) == 0.0


def test_classification_drops_classes_inside_the_reference():
    # found: "location" and "Other location"; "location" is a strict substring of the reference -> dropped -> 1/1
    assert classification_score("Other location", "Other location", ["location", "Other location"]) == 1.0


def test_classification_keeps_longbench_skip_after_a_removal():
    # found: loc, location, Other location. LongBench removes "loc" while iterating, so "location" is never checked
    # and stays: kept = [location, Other location] -> 1/2 (a clean filter would give 1)
    classes = ["loc", "location", "Other location"]
    assert classification_score("Other location", "Other location", classes) == 0.5


def test_classification_needs_the_classes():
    with pytest.raises(ValueError, match="all_classes"):
        score("classification_score", "City", ["City"])


def test_retrieval_score():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    # numbers 3 and 12, one right -> 1/2
    assert retrieval_score("Paragraph 3, not Paragraph 12", "Paragraph 3") == 0.5
    # whole numbers are compared: 13 is not 3
    assert retrieval_score("The answer is Paragraph 13", "Paragraph 3") == 0.0
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    with pytest.raises(ValueError, match="Paragraph"):
        retrieval_score("3", "three")


def test_count_score():
    assert count_score("4", "4") == 1.0
    # numbers 4 and 6, one right -> 1/2
    assert count_score("There are 4 unique paragraphs out of 6", "4") == 0.5
    assert count_score("four", "4") == 0.0


def test_edit_similarity_is_fuzz_ratio():
    # difflib: "abc" matched, 2 * 3 / (4 + 4) = 0.75
    assert edit_similarity("abcd", "abce") == 0.75
    # 2 * 2 / 6 = 0.6667, rounded to whole percent as fuzz.ratio returns an int -> 0.67
    assert edit_similarity("abc", "abd") == 0.67
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("", "x") == 0.0


def test_code_sim_scores_the_first_non_comment_line():
    prediction = "\n```python\n# close the loop\n    return total / count\n```"
    # "```python" has a backtick, "# close..." a hash: the third line is scored, equal to the reference
    assert code_sim_score(prediction, "    return total / count") == 1.0
    # only comment lines -> "" against the reference -> 0
    assert code_sim_score("// TODO\n# nothing", "count++;") == 0.0
    # "abcd" vs "abce" -> 0.75, the line after the comment
    assert code_sim_score("// next\nabcd\nabce", "abce") == 0.75


def test_rouge_l_is_summary_level_on_distinct_words():
    # one sentence each; LCS "the cat on the mat" has 4 distinct words; 5 distinct words on each side:
    # P = R = 4/5 -> F = 0.8 (sentence-level ROUGE-L on token counts would give 5/6)
    assert rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8)


def test_rouge_l_ignores_sentence_order():
    # sentences split on "."; each reference sentence finds its twin: hits {A, cat, sat, dog, ran} = all 5 -> 1
    # (one LCS over the whole token sequences would match only 3 of 6 tokens)
    assert rouge_score("A cat sat. A dog ran.", "A dog ran. A cat sat.") == pytest.approx(1.0)


def test_rouge_l_is_case_sensitive_and_zero_on_empty():
    assert rouge_score("Cat", "cat") == 0.0
    assert rouge_score("", "a cat") == 0.0
    assert rouge_score("...", "a cat") == 0.0


def test_rouge_l_trailing_space_sentence_quirk():
    # "cat sat. " splits into "cat sat" and " ", which the rouge package keeps as a sentence with the word "":
    # prediction words {cat, sat, ""} = 3, reference words {cat, sat} = 2, hits 2 -> P = 2/3, R = 1, F = 0.8
    assert rouge_score("cat sat. ", "cat sat.") == pytest.approx(0.8)


def test_string_match_all_and_part():
    prediction = "The codes are 4521 and 7780."
    # 2 of 3 references contained -> 2/3; the whole list is scored, not the best single reference
    assert score("string_match_all", prediction, ["4521", "7780", "1234"]) == pytest.approx(2 / 3)
    assert score("string_match_part", prediction, ["9999", "7780"]) == 1.0
    assert score("string_match_part", prediction, ["9999"]) == 0.0
    # case-insensitive containment
    assert string_match_all("APPLE pie", ["apple", "Pie"]) == 1.0
    assert string_match_part("APPLE pie", ["pear"]) == 0.0


def test_score_unknown_metric():
    with pytest.raises(ValueError, match="qa_f1_score"):
        score("bleu", "x", ["x"])


def test_registry_names_every_metric():
    assert set(METRICS) == {
        "qa_f1_score",
        "rouge_score",
        "classification_score",
        "retrieval_score",
        "count_score",
        "code_sim_score",
        "edit_similarity",
        "string_match_all",
        "string_match_part",
    }
