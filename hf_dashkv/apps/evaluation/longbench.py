"""LongBench v1, English tasks: the published prompts, generation lengths, truncation and metrics.

LongBench (Bai et al. 2023, arXiv 2308.14508; github.com/THUDM/LongBench, v1 under ``LongBench/``) gives each task
a prompt template (``config/dataset2prompt.json``), a generation length (``config/dataset2maxlen.json``) and a
metric (``eval.py``). They are reproduced here for the 16 English tasks; the 5 Chinese ones (multifieldqa_zh,
dureader, vcsum, lsht, passage_retrieval_zh) are left out, with their jieba-based metrics.

The templates are LongBench's strings character for character, typos included ("asconcisely" in narrativeqa; a
fix was proposed upstream in THUDM/LongBench#76 but not merged), since the prompt wording moves scores.

Data: LongBench's JSONL files, ``{task}.jsonl`` as unpacked from ``data.zip`` of
https://huggingface.co/datasets/THUDM/LongBench, one record a line with ``input``, ``context``, ``answers``,
``length``, ``dataset``, ``language``, ``all_classes`` and ``_id``.

Truncation is LongBench's ``pred.py``: a prompt longer than ``max_length`` tokens (special tokens included, as
the tokenizer adds them by default) keeps its first and last ``max_length // 2`` tokens, each half decoded with
``skip_special_tokens=True`` and the two texts concatenated; the instructions at both ends survive, the middle of
the context goes.

Differences from ``pred.py``, on purpose: no chat template is applied (LongBench wraps the prompt in the model's
chat format except for trec, triviaqa, samsum, lsht, lcc and repobench-p; our models are prompted with plain
text). For trec, triviaqa, samsum and lsht (``metrics.FIRST_LINE_TASKS``) generation stops at the first newline
after some text, since the score reads only the first line after leading newlines; LongBench does so for samsum
(``"\\n"`` as an extra EOS, with ``min_length``) and cuts the others when scoring, so scores are the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .metrics import FIRST_LINE_TASKS
from .sample import Sample

DOWNLOAD_URL = "https://huggingface.co/datasets/THUDM/LongBench"


@dataclass(frozen=True)
class LongBenchTask:
    """One LongBench task.

    Args:
        name: LongBench's dataset name (also its file name, ``{name}.jsonl``).
        prompt: the template, formatted with the record's fields (``{context}``, ``{input}``).
        max_new_tokens: LongBench's generation length for the task (``dataset2maxlen.json``).
        metric: a key of ``hf_dashkv.apps.evaluation.metrics.METRICS`` (``dataset2metric`` of ``eval.py``).
    """

    name: str
    prompt: str
    max_new_tokens: int
    metric: str


_PASSAGES_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nQuestion: {input}\nAnswer:"
)

_TASKS = [
    LongBenchTask(
        "narrativeqa",
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
        "qa_f1_score",
    ),
    LongBenchTask(
        "qasper",
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article "
        "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
        'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
        128,
        "qa_f1_score",
    ),
    LongBenchTask(
        "multifieldqa_en",
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        "qa_f1_score",
    ),
    LongBenchTask("hotpotqa", _PASSAGES_QA, 32, "qa_f1_score"),
    LongBenchTask("2wikimqa", _PASSAGES_QA, 32, "qa_f1_score"),
    LongBenchTask("musique", _PASSAGES_QA, 32, "qa_f1_score"),
    LongBenchTask(
        "gov_report",
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge_score",
    ),
    LongBenchTask(
        "qmsum",
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge_score",
    ),
    LongBenchTask(
        "multi_news",
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge_score",
    ),
    LongBenchTask(
        "trec",
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        "classification_score",
    ),
    LongBenchTask(
        "triviaqa",
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32,
        "qa_f1_score",
    ),
    LongBenchTask(
        "samsum",
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        "rouge_score",
    ),
    LongBenchTask(
        "passage_count",
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32,
        "count_score",
    ),
    LongBenchTask(
        "passage_retrieval_en",
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: ",
        32,
        "retrieval_score",
    ),
    LongBenchTask("lcc", "Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim_score"),
    LongBenchTask(
        "repobench-p",
        "Please complete the code given below. \n{context}{input}Next line of code:\n",
        64,
        "code_sim_score",
    ),
]
TASKS: dict[str, LongBenchTask] = {task.name: task for task in _TASKS}
"""The English LongBench tasks, in LongBench's order, by name."""


def _task_file(folder: Path, name: str) -> Path:
    candidates = [folder / f"{name}.jsonl", folder / "data" / f"{name}.jsonl"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"LongBench task {name!r}: no {candidates[0]} (nor {candidates[1]}). Download data.zip from "
        f"{DOWNLOAD_URL} (its files) and unpack it in {folder}."
    )


def _truncate(prompt: str, tokenizer, max_length: int) -> tuple[str, bool]:
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt, False
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def load_longbench(
    folder: str | Path,
    tokenizer,
    tasks: Iterable[str] | str | None = None,
    max_length: int = 3500,
    limit: int | None = None,
) -> list[Sample]:
    """Read LongBench records and turn them into prompts truncated to ``max_length`` tokens, LongBench's way.

    Args:
        folder: the folder holding ``{task}.jsonl`` (or ``data/{task}.jsonl``, as ``data.zip`` unpacks).
        tokenizer: the model's tokenizer (a transformers tokenizer), used to measure and truncate the prompt.
        tasks: task names (bare or ``"longbench/"``-prefixed); default all of :data:`TASKS`.
        max_length: prompt budget in tokens (LongBench's ``model2maxlen``); also the samples' ``context_tokens``.
        limit: at most this many records per task, the first ones of its file.

    Returns:
        One :class:`Sample` per record, task ``"longbench/{name}"``, in task then file order. ``meta`` keeps the
        record's ``length`` (LongBench-E's length bucket) and whether the prompt was truncated.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (half of it is kept at each end), got {max_length}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LongBench folder {folder} does not exist; download data.zip from {DOWNLOAD_URL}")
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(TASKS) if tasks is None else [name.removeprefix("longbench/") for name in tasks]
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown LongBench task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")

    paths = {name: _task_file(folder, name) for name in names}  # every file checked before any tokenization

    samples = []
    for name, path in paths.items():
        task = TASKS[name]
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        for record in records[:limit]:
            try:
                prompt = task.prompt.format(**record)
            except KeyError as err:
                raise ValueError(f"{path}: record {record.get('_id')!r} lacks the template's field {err}") from None
            prompt, truncated = _truncate(prompt, tokenizer, max_length)
            samples.append(
                Sample(
                    task=f"longbench/{name}",
                    sample_id=record["_id"],
                    prompt=prompt,
                    answers=list(record["answers"]),
                    metric=task.metric,
                    max_new_tokens=task.max_new_tokens,
                    all_classes=record.get("all_classes"),
                    context_tokens=max_length,
                    # only the first line is scored for these, so generating past it changes nothing
                    stop_at_newline=name in FIRST_LINE_TASKS,
                    meta={"length": record.get("length"), "truncated": truncated},
                )
            )
    return samples
