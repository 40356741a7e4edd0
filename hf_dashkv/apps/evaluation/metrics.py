"""Task metrics: LongBench's English scorers and RULER's string matching, all on a 0-1 scale.

LongBench (Bai et al. 2023, arXiv 2308.14508; github.com/THUDM/LongBench, ``metrics.py`` and ``eval.py`` of v1)
scores a prediction against each reference answer and keeps the best, after cutting the prediction of the few-shot
tasks (trec, triviaqa, samsum, lsht) to its first line. :func:`score` applies that rule; the functions below are the
per-reference scorers, re-implemented without LongBench's dependencies:

- ``rouge_score`` matches the ``rouge`` package (pltrdy, 1.0.1) that LongBench calls, not Lin's ROUGE-1.5.5 nor
  Google's ``rouge-score``; see its docstring for what that package actually computes.
- ``code_sim_score`` uses ``difflib.SequenceMatcher``, which is what ``fuzzywuzzy.fuzz.ratio`` runs when
  python-Levenshtein is not installed; with it installed fuzzywuzzy uses Levenshtein's ratio, which can differ.

LongBench reports ``100 * mean``; these functions return 0-1. The Chinese scorers (``qa_f1_zh_score``,
``rouge_zh_score``, ``retrieval_zh_score``, which need jieba) are left out: only the English tasks are run here.

RULER (Hsieh et al. 2024, arXiv 2404.06654; ``scripts/eval/synthetic/constants.py``) scores its synthetic needle
tasks by case-insensitive containment of the references in the prediction: ``string_match_all`` (share of the
references found) and ``string_match_part`` (any reference found). They see the whole reference list at once.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher
from itertools import chain

FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""LongBench tasks whose prediction is cut to its first line (after leading newlines) before scoring: few-shot
prompts, where a model tends to go on with the next example."""

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop ASCII punctuation, then the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 between the normalised prediction and reference (tokens counted with multiplicity)."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(ground_truth).split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _rouge_sentences(text: str) -> list[list[str]]:
    # The rouge package splits on "." and keeps every piece that is non-empty *before* collapsing its whitespace,
    # so a trailing ". " yields an empty sentence whose only word is "" (it counts as a word, as there).
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(reference: list[str], hypothesis: list[str]) -> set[str]:
    """Distinct words of one longest common subsequence, traced back with the rouge package's tie-breaking."""
    table = [[0] * (len(hypothesis) + 1) for _ in range(len(reference) + 1)]
    for i, ref_word in enumerate(reference, 1):
        for j, hyp_word in enumerate(hypothesis, 1):
            if ref_word == hyp_word:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    # Which LCS is traced matters (only its distinct words are kept), hence the package's exact order of checks.
    words, i, j = set(), len(reference), len(hypothesis)
    while i and j:
        if reference[i - 1] == hypothesis[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F as LongBench gets it: ``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]``.

    That package's "rouge-l" is its *summary-level* ``rouge_l_summary_level`` with ``exclusive=True``, which is not
    Lin's union-LCS count:

    - sentences are the pieces of a ``.``-split, words are their ``" "``-split after collapsing whitespace; no lower
      casing, no punctuation removal other than the full stops, no stemming;
    - for every (reference sentence, prediction sentence) pair one LCS is traced back, and the *set* of words of
      all those LCSs is the hit count;
    - recall = hits / distinct reference words, precision = hits / distinct prediction words, F = 2PR / (P + R).

    Differences from LongBench, both negligible: the package adds 1e-8 to the F denominator (a perfect match scores
    0.999999995 there, 1.0 here), and its traceback recurses once per step, so a sentence pair of about 1000 words
    raises RecursionError, which LongBench's bare ``except`` turns into 0; here it is scored. An empty prediction
    or reference (no sentence) scores 0, as in LongBench (the package raises ValueError).
    """
    hyp = _rouge_sentences(prediction)
    ref = _rouge_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    hits = len(set().union(*(_lcs_words(r, h) for r in ref for h in hyp)))
    if hits == 0:
        return 0.0
    precision = hits / len(set(chain.from_iterable(hyp)))
    recall = hits / len(set(chain.from_iterable(ref)))
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, ground_truth: str, all_classes: list[str]) -> float:
    """1/k if the reference is among the k class names found (case-sensitive substrings) in the prediction, else 0.

    Class names found that are strict substrings of the reference are discarded first: a prediction that names
    the reference also contains every shorter class name inside it. Two LongBench quirks are kept for score
    parity: it removes from the list it is iterating over, so the name right after a discarded one is never
    checked; and its fuzzy fallback (closest class by ``difflib``) is unreachable (``em_match_list != 0`` is
    always true), so a prediction naming no class scores 0.
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the task's label set)")
    found = [name for name in all_classes if name in prediction]
    kept, skip_next = [], False
    for name in found:
        if skip_next:
            kept.append(name)
            skip_next = False
        elif name in ground_truth and name != ground_truth:
            skip_next = True
        else:
            kept.append(name)
    return 1.0 / len(kept) if ground_truth in kept else 0.0


def _share_equal(numbers: list[str], target: str) -> float:
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction that equal the paragraph number of the reference ("Paragraph 3")."""
    match = re.search(r"Paragraph (\d+)", ground_truth)
    if match is None:
        raise ValueError(f"retrieval_score: reference {ground_truth!r} has no 'Paragraph <n>'")
    return _share_equal(re.findall(r"\d+", prediction), match.group(1))


def count_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction that equal the reference count."""
    return _share_equal(re.findall(r"\d+", prediction), str(ground_truth))


def edit_similarity(prediction: str, ground_truth: str) -> float:
    """``fuzzywuzzy.fuzz.ratio / 100`` without python-Levenshtein: ``difflib`` ratio, rounded to whole percent.

    Like fuzzywuzzy, equal strings score 1 (even two empty ones) and an empty string against a non-empty one 0.
    """
    if prediction == ground_truth:
        return 1.0
    if not prediction or not ground_truth:
        return 0.0
    return round(100 * SequenceMatcher(None, prediction, ground_truth).ratio()) / 100


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """Edit similarity of the prediction's first code line (no backtick, ``#`` or ``//``) to the reference line.

    Models often open with a Markdown fence or a comment; LongBench scores the first line that is neither.
    """
    lines = prediction.lstrip("\n").split("\n")
    first_code_line = next((line for line in lines if not any(mark in line for mark in ("`", "#", "//"))), "")
    return edit_similarity(first_code_line, ground_truth)


def _contained(prediction: str, references: list[str]) -> list[bool]:
    prediction = prediction.lower()
    return [reference.lower() in prediction for reference in references]


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER: share of the references contained in the prediction, case-insensitive (0 with no reference)."""
    hits = _contained(prediction, references)
    return sum(hits) / len(hits) if hits else 0.0


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER: 1 if any reference is contained in the prediction, case-insensitive, else 0."""
    return float(any(_contained(prediction, references)))


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": qa_f1_score,
    "rouge_score": rouge_score,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
    "edit_similarity": edit_similarity,
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
"""Metric name (``Sample.metric``) -> scorer. All but the string_match ones score one reference at a time."""

_WHOLE_LIST = frozenset({"string_match_all", "string_match_part"})


def score(
    metric: str,
    prediction: str,
    answers: list[str],
    all_classes: list[str] | None = None,
    task: str | None = None,
) -> float:
    """Score one prediction in [0, 1] the way LongBench's ``scorer`` does.

    Args:
        metric: a key of :data:`METRICS`.
        prediction: the generated text.
        answers: the references; per-reference metrics keep the best score (0 with no reference), the
            string_match metrics take the whole list.
        all_classes: the label set, for ``classification_score``.
        task: the task name, bare or ``"longbench/"``-prefixed; for trec, triviaqa, samsum and lsht the prediction
            is first cut to its first line after leading newlines.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if task is not None and task.removeprefix("longbench/") in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    scorer = METRICS[metric]
    if metric in _WHOLE_LIST:
        return scorer(prediction, answers)
    if metric == "classification_score":
        return max((scorer(prediction, answer, all_classes) for answer in answers), default=0.0)
    return max((scorer(prediction, answer) for answer in answers), default=0.0)
