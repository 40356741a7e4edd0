"""Tables (markdown + CSV) and plots from the predictions of ``dashkv eval``: every method as a ratio to ``full``."""

from __future__ import annotations

import csv
import math
import random
from collections import defaultdict
from pathlib import Path
from statistics import mean

from .runner import METHODS

FIELDS = ("task", "context_tokens", "method", "budget", "samples", "score", "ratio_to_full", "kl", "agreement",
          "steps", "token_agreement", "nll", "perplexity", "recall")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def token_agreement(items: list[dict], key: str = "agreement") -> tuple[float | None, int | None]:
    """Greedy agreement pooled over compared tokens, and their count: ``items`` are records (``key="agreement"``,
    a mean over the record's ``steps``) or summary rows (``key="token_agreement"``); items that compared no token
    (``steps`` 0: full attention's record of a prompt with no answer) weigh nothing. ``(None, 0)`` if no token was
    compared; ``(None, None)`` if an item lacks ``steps`` (predictions written before it was recorded).

    A mean over prompts weighs a one-token answer as much as a 60-token summary; pooled, each decode step counts once.
    """
    if any(item.get("agreement") is not None and item.get("steps") is None for item in items):
        return None, None
    compared = _compared(items)
    steps = sum(item["steps"] for item in compared)
    return (sum(item[key] * item["steps"] for item in compared) / steps if steps else None), steps


def _compared(items: list[dict]) -> list[dict]:
    """The records (or rows) that compared at least one token; call after checking that all carry ``steps``."""
    return [item for item in items if item.get("agreement") is not None and item["steps"]]


def agreement_interval(records: list[dict], level: float = 0.9, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap interval of :func:`token_agreement` over prompts (``records`` resampled with replacement): how
    far the pooled agreement of this many prompts may move with other prompts. ``None`` if it has no number."""
    if token_agreement(records)[0] is None:
        return None
    compared = _compared(records)
    rng = random.Random(seed)
    values = sorted(token_agreement(rng.choices(compared, k=len(compared)))[0] for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return values[tail], values[resamples - 1 - tail]


def summarize(records: list[dict]) -> list[dict]:
    """One row per (task, context, method, budget): means over samples, and the score's ratio to ``full``.

    ``recall`` is the mean over hashed layers and samples; ``perplexity`` is ``exp`` of the mean continuation NLL;
    ``agreement`` is the mean over samples, ``token_agreement`` the same pooled over the ``steps`` compared tokens.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("error") is not None:
            continue
        groups[(record["task"], record["context_tokens"], record["method"], record["budget"])].append(record)
    rows = []
    for (task, context, method, budget), group in sorted(groups.items(), key=lambda item: _order(item[0])):
        nll = _mean(r["nll"] for r in group)
        pooled, steps = token_agreement(group)
        rows.append(dict(
            task=task, context_tokens=context, method=method, budget=budget, samples=len(group),
            score=_mean(r["score"] for r in group), kl=_mean(r["kl"] for r in group),
            agreement=_mean(r["agreement"] for r in group), steps=steps, token_agreement=pooled, nll=nll,
            perplexity=math.exp(nll) if nll is not None else None,
            recall=_mean(v for r in group for v in r["recall"].values()),
        ))
    full = {(r["task"], r["context_tokens"]): r["score"] for r in rows if r["method"] == "full"}
    for row in rows:
        reference = full.get((row["task"], row["context_tokens"]))
        row["ratio_to_full"] = row["score"] / reference if row["score"] is not None and reference else None
    return rows


def failed_samples(records: list[dict]) -> list[str]:
    """Keys of samples whose last attempt failed (a rerun retries them; an earlier failure then no longer counts)."""
    succeeded = {r["key"] for r in records if r.get("error") is None}
    return sorted({r["key"] for r in records if r.get("error") is not None} - succeeded)


def _order(key: tuple) -> tuple:
    task, context, method, budget = key
    return (context, task, budget != "-", _budget_value(budget), METHODS.index(method) if method in METHODS else 99)


def _budget_value(label: str) -> float:
    if label == "-":
        return 0.0
    return 1 / float(label[2:]) if label.startswith("1/") else float(label)


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(method, budget) pairs in display order: full, then by budget, each budget in METHODS order."""
    seen = []
    for row in sorted(rows, key=lambda r: _order((r["task"], 0, r["method"], r["budget"]))):
        pair = (row["method"], row["budget"])
        if pair not in seen:
            seen.append(pair)
    return seen


def _label(method: str, budget: str) -> str:
    return method if budget == "-" else f"{method} {budget}"


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], failed: list[str] = (), intervals: dict | None = None) -> str:
    """Task scores per method (ratio to full in brackets), then fidelity per method, as markdown tables;
    ``intervals``: ``{(context, method, budget): (low, high)}`` of the per-token agreement
    (:func:`agreement_interval`), shown beside it."""
    pairs = columns(rows)
    scored = [r for r in rows if r["score"] is not None]
    tasks = sorted({(r["context_tokens"], r["task"]) for r in scored})
    cell = {(r["context_tokens"], r["task"], r["method"], r["budget"]): r for r in rows}
    head = "| tokens | task | n | " + " | ".join(_label(*p) for p in pairs) + " |"
    lines = [head, "|" + "---|" * (3 + len(pairs))]
    for context, task in tasks:
        values = []
        for method, budget in pairs:
            row = cell.get((context, task, method, budget))
            if row is None or row["score"] is None:
                values.append("–")
            elif method == "full":
                values.append(_fmt(row["score"]))
            else:
                values.append(f"{_fmt(row['score'])} ({_fmt(row['ratio_to_full'], 2)})")
        n = cell.get((context, task, "full", "-"), {}).get("samples", "")
        lines.append(f"| {context} | {task} | {n} | " + " | ".join(values) + " |")
    for context in sorted({c for c, _ in tasks}):
        averages = []
        for method, budget in pairs:
            group = [r for r in scored if (r["method"], r["budget"], r["context_tokens"]) == (method, budget, context)]
            score, ratio = _mean(r["score"] for r in group), _mean(r["ratio_to_full"] for r in group)
            averages.append(_fmt(score) if method == "full" else f"{_fmt(score)} ({_fmt(ratio, 2)})")
        lines.append(f"| {context} | **mean** | | " + " | ".join(averages) + " |")

    lines += ["", "| tokens | method | budget | recall | next-token KL | greedy agreement (task mean) "
              "| greedy agreement (per token, 90% interval) | gold NLL | perplexity (Δ full) |", "|---" * 9 + "|"]
    for context in sorted({r["context_tokens"] for r in rows}):
        ppl = {(r["method"], r["budget"]): r["perplexity"]
               for r in rows if r["task"] == "perplexity" and r["context_tokens"] == context}
        full_ppl = ppl.get(("full", "-"))
        for method, budget in pairs:
            group = [r for r in rows if (r["method"], r["budget"], r["context_tokens"]) == (method, budget, context)]
            gold = _mean(r["nll"] for r in group if r["task"] != "perplexity")
            value = ppl.get((method, budget))
            delta = f"{_fmt(value, 2)} ({value - full_ppl:+.2f})" if value is not None and full_ppl else "–"
            recall = _mean(r["recall"] for r in group) if method != "full" else 1.0
            pooled = _fmt(token_agreement(group, "token_agreement")[0])
            interval = (intervals or {}).get((context, method, budget))
            if interval and method != "full":
                pooled += f" ({interval[0]:.3f}-{interval[1]:.3f})"
            lines.append(
                f"| {context} | {method} | {budget} | {_fmt(recall)} | {_fmt(_mean(r['kl'] for r in group), 4)} | "
                f"{_fmt(_mean(r['agreement'] for r in group))} | {pooled} | {_fmt(gold)} | {delta} |"
            )
    if failed:
        lines += ["", f"{len(failed)} sample(s) failed ({', '.join(failed)}); the errors are in the predictions file."]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in FIELDS} for row in rows)


def _color(method: str) -> str:
    """One colour per method in both panels (matplotlib's cycle, in METHODS order)."""
    return f"C{METHODS.index(method) if method in METHODS else len(METHODS)}"


def plot(rows: list[dict], records: list[dict], path: Path) -> None:
    """Left: mean task score (ratio to full) vs budget per method. Right: attention recall per layer per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    scored = [r for r in rows if r["ratio_to_full"] is not None and r["method"] != "full"]
    budgets = sorted({r["budget"] for r in scored if r["budget"] != "-"}, key=_budget_value)
    for method in sorted({r["method"] for r in scored}, key=lambda m: _order(("", 0, m, "-"))):
        ys = [_mean(r["ratio_to_full"] for r in scored if r["method"] == method and r["budget"] in (b, "-"))
              for b in budgets]
        left.plot(budgets, ys, "o-", color=_color(method), label=method)
    left.axhline(1.0, color="k", linestyle="--", label="full")
    left.set(xlabel="budget (share of the context, + sinks + recent)", ylabel="mean task score / full",
             title="task score relative to full attention")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    per_layer: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.get("error") is None and record["method"] != "full":
            for layer, value in record["recall"].items():
                per_layer[(record["method"], record["budget"])][int(layer)].append(value)
    styles = {b: style for b, style in zip(["-"] + budgets, ["-", "-", "--", ":", "-."] * 4)}
    for (method, budget), layers in sorted(per_layer.items(), key=lambda item: _order(("", 0, *item[0]))):
        xs = sorted(layers)
        right.plot(xs, [mean(layers[x]) for x in xs], marker="o", linestyle=styles.get(budget, "-"), markersize=3,
                   color=_color(method), label=_label(method, budget))
    right.set(xlabel="layer", ylabel="attention recall", title="recall per layer (decode steps)", ylim=(0, 1.02))
    right.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[dict], out_dir: Path) -> str:
    """``results.md``, ``results.csv`` and ``results.png`` in ``out_dir``; returns the markdown."""
    rows = summarize(records)
    groups = defaultdict(list)
    for record in records:
        if record.get("error") is None:
            groups[(record["context_tokens"], record["method"], record["budget"])].append(record)
    intervals = {key: agreement_interval(group) for key, group in groups.items()}
    text = markdown(rows, failed_samples(records), intervals)
    (out_dir / "results.md").write_text(text + "\n", encoding="utf-8")
    write_csv(rows, out_dir / "results.csv")
    plot(rows, records, out_dir / "results.png")
    return text
