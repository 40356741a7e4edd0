"""``dashkv recall``: how well hash codes rank the keys attention needs, over the candidates only (docs/design.md §4).

For a model, its encoders and held-out text, at a context length and budget: the last ``queries`` positions of
each sequence play decode steps. Every method selects with the one rule (``selection.select``: the budget
nearest candidates per KV group, by that method's scores), and ``recall.ranking_recall`` scores the selection:
``R@k|B`` (k = 1, 8, 32; mean and 10th percentile of R@8 over query heads and positions) and the candidate mass.

Methods: the encoders' hash codes (``trained``), random projections of the same width (``simhash``, the floor),
optionally the trained codes with re-ranking (``rerank2`` ...: the codes shortlist 2 x budget, exact scores pick
the budget; ``plans.RerankPlan``), and two ceilings: ``oracle`` (exact scores: the group's summed softmax over the
candidates) and ``angle``
(the same with each key scaled to the mean key norm: the best any code that sees only a key's direction can do).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..capture import capture_attention
from ..encoders import HashEncoders
from ..plans import rerank_scores
from ..policy import DecodePolicy
from ..recall import attention_probs, ranking_recall
from ..selection import candidates, select
from ..selectors.hash import position_distances

METHODS = ("trained", "simhash", "oracle", "angle")
METRICS = ("R@1", "R@8", "R@32", "mass")
TEXTS = ("essays", "squad")


def probe_sequences(tokenizer, text: str, length: int, count: int) -> list[torch.Tensor]:
    """``count`` token sequences ``[1, length]`` from evenly spread places of a held-out text.

    ``text``: ``"essays"`` (Paul Graham's essays: never trained on, measured here only), ``"squad"`` (SQuAD dev
    articles, evaluation side only), or a path to a UTF-8 text file.
    """
    from .. import corpora

    if text == "essays":
        raw = corpora.haystack_text()
    elif text == "squad":
        raw = "\n\n".join(p["context"] for a in corpora.squad_articles() for p in a["paragraphs"])
    elif Path(text).is_file():
        raw = Path(text).read_text(encoding="utf-8")
    else:
        raise ValueError(f"--text {text!r}: use one of {TEXTS} or the path of a text file.")
    ids = tokenizer(raw, return_tensors="pt").input_ids[0]
    if len(ids) < length:
        raise ValueError(f"--text {text!r} has {len(ids)} tokens, fewer than one {length}-token sequence.")
    starts = torch.linspace(0, len(ids) - length, count).long().tolist()
    return [ids[s : s + length].view(1, -1) for s in starts]


def exact_scores(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scale: float, angle: bool):
    """The ceilings' scores ``[B, Hkv, P, N]`` (lower is nearer): minus the group's summed softmax over the
    candidates, of ``q . k`` (``angle=False``) or of ``q . k / |k| * mean |k|``."""
    if angle:
        norms = key.float().norm(dim=-1, keepdim=True)
        key = key.float() / norms.clamp_min(1e-6) * norms.mean(-2, keepdim=True)
    probs = attention_probs(query, key, scale, allowed[:, None, None]).nan_to_num(0.0)
    return -probs.sum(2)


@dataclass
class ProbeTable:
    """Per method and layer, the per-(head, position) values of each metric, collected over sequences."""

    values: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))

    def add(self, method: str, layer: int, measured: dict[str, torch.Tensor]) -> None:
        for name, value in measured.items():
            self.values[method][layer][name].append(value.flatten())

    def layer(self, method: str, layer: int) -> dict[str, float]:
        cat = {name: torch.cat(v) for name, v in self.values[method][layer].items()}
        stats = {name: float(v.mean()) for name, v in cat.items()}
        stats["p10 R@8"] = float(cat["R@8"].quantile(0.1))
        return stats

    def summary(self, method: str) -> dict[str, float]:
        per = [self.layer(method, i) for i in sorted(self.values[method])]
        out = {name: sum(p[name] for p in per) / len(per) for name in per[0]}
        out["min layer R@8"] = min(p["R@8"] for p in per)
        return out

    def to_dict(self) -> dict:
        return {m: {"layers": {i: self.layer(m, i) for i in sorted(self.values[m])}, "mean": self.summary(m)}
                for m in self.values}


@torch.no_grad()
def probe(model, encoders: HashEncoders, sequences: list[torch.Tensor], policy: DecodePolicy, queries: int = 32,
          methods=METHODS, rerank=(), progress=None) -> ProbeTable:
    """Measure every method at the last ``queries`` positions of each sequence, in every hashed layer.

    Args:
        model: the model the encoders are for; encoders: trained hash encoders (their layers are measured);
        sequences: token ids ``[1, T]``; policy: budget, sinks, recent window and group rule;
        rerank: re-ranking factors to measure the trained codes with (methods ``rerank2``, ...);
        progress: an optional callable called once per sequence (a progress bar's ``update``).
    """
    layers = encoders.layout.hashed_layers
    simhash = HashEncoders.random(model.config, encoders.config, encoders.layout.dense_layers, seed=0)
    table = ProbeTable()
    for ids in sequences:
        captured = capture_attention(model, ids, max(layers))
        length = ids.shape[1]
        positions = torch.arange(length - queries, length)
        allowed = candidates(policy.sink_tokens, policy.recent_tokens, torch.zeros(1, dtype=torch.long),
                             positions + 1, length)  # [1, P, N]
        for layer in layers:
            query, key, _, scale = captured[layer]
            query, key = query[:, :, -queries:].float(), key.float()
            hashed = {}
            for method in (*methods, *(f"rerank{r}" for r in rerank)):
                if method in ("trained", "simhash"):
                    codes = (encoders if method == "trained" else simhash)[layer]
                    scores = hashed[method] = position_distances(codes, query, codes.encode_keys(key),
                                                                 policy.group_reduce)
                elif method.startswith("rerank"):
                    factor = replace(policy, rerank=int(method[len("rerank"):]))
                    scores = rerank_scores(query, key, hashed["trained"], factor, positions + 1, None, scale)
                else:
                    scores = exact_scores(query, key, allowed, scale, angle=method == "angle")
                chosen = select(scores, policy, positions + 1).mask(length)
                table.add(method, layer, ranking_recall(query, key, chosen, allowed, positions, scale))
        del captured
        if progress is not None:
            progress()
    return table


def markdown(table: ProbeTable, dense_layers=()) -> str:
    """The summary (mean over hashed layers) and the per-layer R@8 / R@1 of each method."""
    methods = [m for m in METHODS if m in table.values] + sorted(m for m in table.values if m.startswith("rerank"))
    lines = ["| method | R@1 | R@8 | R@32 | candidate mass | p10 R@8 | min layer R@8 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        s = table.summary(m)
        lines.append(f"| {m} | {s['R@1']:.3f} | **{s['R@8']:.3f}** | {s['R@32']:.3f} | {s['mass']:.3f} | "
                     f"{s['p10 R@8']:.3f} | {s['min layer R@8']:.3f} |")
    lines += ["", "| layer | " + " | ".join(f"{m} R@8" for m in methods) + " | " + " | ".join(
        f"{m} R@1" for m in methods) + " |", "|---:|" + "---:|" * (2 * len(methods))]
    for i in sorted(table.values[methods[0]]):
        row = [table.layer(m, i) for m in methods]
        lines.append(f"| {i} | " + " | ".join(f"{r['R@8']:.3f}" for r in row) + " | "
                     + " | ".join(f"{r['R@1']:.3f}" for r in row) + " |")
    return "\n".join(lines)


def plot(tables: dict[str, ProbeTable], path: Path) -> None:
    """Per-layer R@8 of every method, one panel per setting (e.g. context length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 3.6), squeeze=False)
    styles = {"trained": ("tab:blue", "o-"), "simhash": ("tab:gray", "s--"), "oracle": ("tab:green", ":"),
              "angle": ("tab:olive", "-.")}
    for ax, (title, table) in zip(axes[0], tables.items()):
        extra = iter(("tab:purple", "tab:orange", "tab:brown", "tab:pink"))  # one colour per re-ranking factor
        for m in [m for m in METHODS if m in table.values] + sorted(m for m in table.values if m not in METHODS):
            layers = sorted(table.values[m])
            color, style = styles[m] if m in styles else (next(extra), "^-")
            ax.plot(layers, [table.layer(m, i)["R@8"] for i in layers], style, color=color, label=m, markersize=3)
        ax.set(title=title, xlabel="layer", ylabel="R@8|B over candidates", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(model_name: str, encoders: HashEncoders, texts, contexts, budget: float, sequences: int, queries: int,
        out_dir: Path, rerank=(), group_reduce: str | None = None) -> dict[str, ProbeTable]:
    """The whole ``dashkv recall`` job: ``results.md``, ``results.json`` and ``recall.png`` in ``out_dir``.

    ``group_reduce``: how the hash methods combine a GQA group's distances (default: the encoders' recommended
    policy's)."""
    from tqdm import tqdm

    from .bench import budget_label
    from ..embedded import load_model

    model, tokenizer = load_model(model_name)
    encoders.check_compatible(model.config)
    recommended = encoders.policy or DecodePolicy()
    config = replace(recommended, budget=budget, group_reduce=group_reduce or recommended.group_reduce, rerank=1)
    tables = {}
    with tqdm(total=len(texts) * len(contexts) * sequences, desc="recall probe", unit="seq") as bar:
        for text in texts:
            for length in contexts:
                if length - queries <= config.sink_tokens + config.recent_tokens + 32:
                    raise ValueError(f"--context {length} leaves too few candidates; use at least 1024 tokens.")
                ids = probe_sequences(tokenizer, text, length, sequences)
                tables[f"{text}, {length // 1024}k"] = probe(model, encoders, ids, config, queries, rerank=rerank,
                                                               progress=bar.update)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (f"# Hash ranking recall: {model_name}, {encoders.config.bits} bits, budget {budget_label(budget)}, "
              f"group {config.group_reduce}, {sequences} sequences x last {queries} positions\n\nCandidates only "
              f"(between {config.sink_tokens} "
              f"sinks and a {config.recent_tokens}-token recent window). R@k|B: share of each query head's true top-k "
              "candidates inside its KV group's selection.\n")
    body = "\n\n".join(f"## {name}\n\n{markdown(table)}" for name, table in tables.items())
    (out_dir / "results.md").write_text(header + "\n" + body + "\n")
    (out_dir / "results.json").write_text(json.dumps({n: t.to_dict() for n, t in tables.items()}, indent=1))
    plot(tables, out_dir / "recall.png")
    return tables
