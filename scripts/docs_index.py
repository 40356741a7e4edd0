"""Write docs/README.md: an index of every run folder under docs/, from the runs' own records.

    python scripts/docs_index.py          # from the repository root; rewrites docs/README.md

A run folder is a directory under docs/{eval,recall,bench}/ or docs/archive/{eval,recall,bench}/ that holds a
results.md, results.json or serving.json. For each run it reads:

- date and commit: per record file (results.md, results.json, predictions.jsonl, generate.md, selection.md; not
  setup.json, whose machine path was scrubbed later), the commit that introduced its current content (``git log
  --find-object``), the newest over the files: the run's own commit, not one that only moved the folder;
- setup.json (``dashkv eval``): the model, the suite seed, and per method its decode config and a digest of its
  encoders' weights, which is compared with the same digest computed here from the shipped encoders' safetensors;
- predictions.jsonl (``dashkv eval``): how many records, prompts and methods;
- results.md: the headline tables (``dashkv eval``: task-mean ratios and the fidelity table; ``dashkv recall``:
  the title line and the mean R@k per method and length);
- results.json and generate.md (``dashkv bench``): the encoder configs and the ratios at the longest context;
- serving.json (``dashkv bench --engine vllm``): the policy and each shape's ratios;
- the command: the first command in docs/*.md (or generate.md) that writes into the folder (``--out-dir``).

What a run's records do not hold is written as "not recorded". Standard library only; the output depends only on
the files and the git history, so reruns give the same file.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ASSETS = ROOT / "hf_dashkv" / "assets" / "encoders"
KINDS = ("eval", "recall", "bench")
RECORDS = ("results.md", "results.json", "predictions.jsonl", "generate.md", "selection.md", "serving.json")
NOT_RECORDED = "not recorded"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def weights_digest(path: Path) -> str:
    """The digest ``dashkv eval`` records in setup.json (runner.run_identity): sha256 over the sorted state-dict
    names and raw tensor bytes, first 16 hex digits; read here straight from the safetensors file."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    digest = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        start, end = header[name]["data_offsets"]
        digest.update(name.encode())
        digest.update(data[8 + size + start:8 + size + end])
    return digest.hexdigest()[:16]


def shipped_digests() -> dict[str, str]:
    return {weights_digest(p / "model.safetensors"): p.name
            for p in sorted(ASSETS.iterdir()) if (p / "model.safetensors").is_file()}


def run_folders() -> list[Path]:
    runs = []
    for base in (DOCS, DOCS / "archive"):
        for kind in KINDS:
            folder = base / kind
            if not folder.is_dir():
                continue
            for d in sorted(folder.iterdir()):
                if d.is_dir() and any((d / name).is_file() for name in ("results.md", "results.json", "serving.json")):
                    runs.append(d)
    return runs


def origin(run: Path) -> tuple[str, str]:
    """(date, commit) of the last commit that wrote one of the run's records: for each record file, the oldest
    commit that introduced its current content (``git log --find-object``; renames do not change content, so
    moving a folder does not count), the newest of those over the files."""
    best = None
    for name in RECORDS:
        f = run / name
        if not f.is_file():
            continue
        blob = git("rev-parse", f"HEAD:{f.relative_to(ROOT).as_posix()}")
        if not blob or "fatal" in blob:
            continue
        out = git("log", "HEAD", f"--find-object={blob}", "--format=%ct %ad %h", "--date=short")
        if out:
            ct, date, commit = out.splitlines()[-1].split()
            if best is None or int(ct) > best[0]:
                best = (int(ct), date, commit)
    return (best[1], best[2]) if best else ("not committed", "not committed")


def fraction(budget) -> str:
    if isinstance(budget, int) and budget >= 2 ** 31 - 1:
        return "covers the context"
    if isinstance(budget, float) and 0 < budget < 1 and abs(1 / budget - round(1 / budget)) < 1e-9:
        return f"1/{round(1 / budget)}"
    return str(budget)


def policy_text(c: dict) -> str:
    return (f"{c['bits']} bits, budget {fraction(c['budget'])}, {c['sink_tokens']} sinks, {c['recent_tokens']} recent, "
            f"dense {c['dense_layers'] or 'none'}, group {c['group_reduce']}, rerank {c['rerank']}")


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in ``text``: each a list of rows (header first), cells stripped, separator rows dropped."""
    out, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            out.append(cur)
            cur = []
    return out


def find_command(run: Path) -> str:
    rel = run.relative_to(ROOT).as_posix()
    pattern = re.compile(r"--out-dir\s+" + re.escape(rel) + r"(?![\w-])")
    found = []
    gen = run / "generate.md"
    if gen.is_file():
        found += [f"`{line.strip()}` (generate.md)" for line in gen.read_text().splitlines()
                  if line.strip().startswith("dashkv ")][:1]
    for doc in sorted(DOCS.glob("*.md")):
        if doc.name == "README.md":
            continue
        text = doc.read_text()
        fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
        spans = [line.split("#")[0] for block in fenced for line in block.replace("\\\n", " ").splitlines()]
        for paragraph in re.sub(r"```.*?```", "", text, flags=re.S).split("\n\n"):
            spans += re.findall(r"`([^`]+)`", paragraph)
        for span in spans:
            if pattern.search(span):
                cmd = " ".join(span.split())
                tool = {"eval": "dashkv eval", "recall": "dashkv recall", "bench": "dashkv bench"}[run.parent.name]
                if not cmd.startswith("dashkv"):
                    cmd = f"{tool} ... {cmd}"
                return "; ".join([f"`{cmd}` (as quoted in docs/{doc.name})", *found])
    return "; ".join(found) or NOT_RECORDED


def eval_facts(run: Path, shipped: dict[str, str]) -> dict:
    facts = {"encoders": NOT_RECORDED, "policy": [], "model": NOT_RECORDED, "headline": []}
    setup = run / "setup.json"
    if setup.is_file():
        s = json.loads(setup.read_text())
        facts["model"] = f"{s.get('model', NOT_RECORDED)}, suite seed {s.get('suite_seed', NOT_RECORDED)}"
        encs = []
        for name, v in s["setups"].items():
            facts["policy"].append(f"{name}: {v['config']['selector']} selector, {policy_text(v['config'])}")
            if v.get("encoders"):
                d = v["encoders"]
                tag = (f"shipped {shipped[d]}" if d in shipped else "untrained random projections"
                       if name.startswith("random") else "not the shipped weights")
                encs.append(f"{name.split()[0]} `{d}` ({tag})")
        facts["encoders"] = "; ".join(dict.fromkeys(encs)) or "none (no hash method)"
    else:
        facts["policy"].append(f"{NOT_RECORDED} (no setup.json); methods and budgets in results.md")
    preds = run / "predictions.jsonl"
    if preds.is_file():
        recs = []
        for line in preds.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        prompts = {(r.get("task"), r.get("context_tokens"), r.get("sample_id")) for r in recs}
        methods = sorted({f"{r.get('method')}" for r in recs})
        tasks = sorted({r.get("task") for r in recs})
        ctx = sorted({r.get("context_tokens") for r in recs if r.get("context_tokens")})
        facts["records"] = (f"{len(recs)} records, {len(prompts)} prompts ({len(tasks)} task{'s' * (len(tasks) != 1)} at {', '.join(map(str, ctx))} "
                            f"tokens), methods {', '.join(methods)}")
    md = run / "results.md"
    if md.is_file():
        for t in tables(md.read_text()):
            head = t[0]
            if "task" in head and "full" in head:
                for row in t[1:]:
                    if "**mean**" in row:
                        cells = [f"{h} {c}" for h, c in zip(head[head.index("full"):], row[head.index("full"):])]
                        facts["headline"].append(f"task mean at {row[0]} tokens (ratio to full): " + ", ".join(cells))
            if "method" in head and "next-token KL" in head:
                agree = [i for i, h in enumerate(head) if h.startswith("greedy agreement")]
                for row in t[1:]:
                    r = dict(zip(head, row))
                    if r.get("method") == "full":
                        continue
                    parts = [f"recall {r['recall']}", f"KL {r['next-token KL']}"]
                    parts += [f"{head[i].replace('greedy agreement', 'agreement')} {row[i]}" for i in agree]
                    facts["headline"].append(f"{r['method']} {r['budget']} at {r['tokens']} tokens: " + ", ".join(parts))
    return facts


def recall_facts(run: Path) -> dict:
    facts = {"encoders": f"{NOT_RECORDED} (no weights digest in the probe's records)", "policy": [], "model": NOT_RECORDED,
             "headline": []}
    md = run / "results.md"
    text = md.read_text() if md.is_file() else ""
    title = re.search(r"^# Hash ranking recall: (.+)$", text, flags=re.M)
    if title:
        model, _, rest = title.group(1).partition(", ")
        facts["model"] = model
        group = "" if "group" in rest else f", group {NOT_RECORDED}"
        facts["policy"].append(rest + group)
    sinks = re.search(r"between (\d+) sinks and a (\d+)-token recent window", text)
    if sinks:
        facts["policy"].append(f"{sinks.group(1)} sinks, {sinks.group(2)} recent (candidates between them)")
    for section, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S):
        t = tables(body)
        if t and "R@8" in t[0][0]:
            head = t[0][0]
            cells = [f"{row[0]} {row[head.index('R@8')].strip('*')}" for row in t[0][1:]]
            facts["headline"].append(f"{section}, mean R@8: " + ", ".join(cells))
    return facts


def bench_facts(run: Path) -> dict:
    facts = {"encoders": "untrained encoders of each config (speed does not depend on the weights); "
                         f"weights digest {NOT_RECORDED}", "policy": [], "model": NOT_RECORDED, "headline": []}
    res = run / "results.json"
    if res.is_file():
        r = json.loads(res.read_text())
        meta = r.get("meta", {})
        facts["model"] = (f"shapes {', '.join(sorted({x['shape'] for x in r['results']}))}; device {meta.get('device')}, "
                          f"{meta.get('threads')} threads, torch {meta.get('torch')}, {meta.get('repeats')} repeats")
        configs = {}
        for x in r["results"]:
            e = x["encoders"]
            configs[e["name"]] = f"{e['name']}: {e['bits']} bits, query_hidden {e['query_hidden']}, rerank {e['rerank']}"
        budgets = sorted({fraction(x["budget"]) for x in r["results"]})
        facts["policy"] = [*configs.values(), f"budget {', '.join(budgets)}"]
        longest = max(x["context"] for x in r["results"])
        for x in r["results"]:
            if x["context"] != longest:
                continue
            line = (f"{x['encoders']['name']} r{x['encoders']['rerank']}, {x['shape']} {x['dtype']} {longest // 1024}k: "
                    f"attention call {x['sdpa_ms'] / x['dashkv_ms']:.1f}x SDPA")
            step = x.get("step_ms") or {}
            if step.get("full") and step.get("dashkv"):
                line += f", decoder-layer step {step['full'] / step['dashkv']:.2f}x full"
            facts["headline"].append(line)
    serving = run / "serving.json"
    if serving.is_file():  # dashkv bench --engine vllm
        s = json.loads(serving.read_text())
        facts["model"] = f"SmolLM2-135M fp32 in vLLM and transformers, {s['vllm']['threads']} threads"
        facts["encoders"] = "the shipped smollm2-135m encoders"
        facts["policy"] = [", ".join(f"{k} {v}" for k, v in s["policy"].items())]
        for r in s["results"]:
            vllm = sorted(r["vllm_tok_s"])[len(r["vllm_tok_s"]) // 2]
            dash = sorted(r["vllm_dashkv_tok_s"])[len(r["vllm_dashkv_tok_s"]) // 2]
            facts["headline"].append(
                f"{r['batch']} x {r['context'] // 1024}k: vLLM + DASH-KV {dash / vllm:.2f}x vLLM; generate "
                f"{r['generate_dashkv_tok_s'] / r['generate_full_tok_s']:.2f}x full")
    gen = run / "generate.md"
    if gen.is_file():
        for t in tables(gen.read_text()):
            head = t[0]
            if "vs full" in head:
                for row in t[1:]:
                    r = dict(zip(head, row))
                    label = r.get("policy") or r.get("budget", "")
                    facts["headline"].append(f"generate {r.get('context')} ({label}): DASH-KV {r.get('DASH-KV tok/s')} tok/s, "
                                             f"{r['vs full'].strip('*')} vs full")
    return facts


def describe(run: Path, shipped: dict[str, str]) -> tuple[dict, list[str]]:
    kind = run.parent.name
    facts = {"eval": lambda: eval_facts(run, shipped), "recall": lambda: recall_facts(run),
             "bench": lambda: bench_facts(run)}[kind]()
    facts["date"], facts["commit"] = origin(run)
    facts["command"] = find_command(run)
    rel = run.relative_to(DOCS).as_posix()
    lines = [f"### [{rel}]({rel}/)", "",
             f"- date, commit: {facts['date']}, {facts['commit']}",
             f"- model: {facts['model']}",
             f"- encoders: {facts['encoders']}"]
    if facts.get("records"):
        lines.append(f"- predictions.jsonl: {facts['records']}")
    lines.append("- policy:" + ("" if len(facts["policy"]) > 1 else f" {facts['policy'][0] if facts['policy'] else NOT_RECORDED}"))
    if len(facts["policy"]) > 1:
        lines += [f"  - {p}" for p in facts["policy"]]
    lines.append(f"- command: {facts['command']}")
    lines.append("- headline:" + ("" if facts["headline"] else f" {NOT_RECORDED}"))
    lines += [f"  - {h}" for h in facts["headline"]]
    return facts, lines + [""]


def main() -> None:
    shipped = shipped_digests()
    runs = run_folders()
    out = ["<!-- Generated by `python scripts/docs_index.py` from the runs' own records; do not edit by hand. -->",
           "",
           "# Run index",
           "",
           "Regenerate with `python scripts/docs_index.py` (from the repository root). Every run folder under docs/,",
           "with what its own records say: date and commit (the last commit that added or changed its records),",
           "encoders (for `dashkv eval`, the digest of the encoders' weights that setup.json records, checked against",
           "the shipped encoders), decode policy, the command that wrote it, headline numbers. \"not recorded\": the",
           "run's files do not hold it. What the runs mean is discussed in [evaluation.md](evaluation.md),",
           "[encoders.md](encoders.md), [experiments.md](experiments.md) and [speed.md](speed.md); how they are measured in",
           "[design.md §4](design.md#4-how-we-measure).",
           "",
           "Shipped encoders' weight digests: " + ", ".join(f"{name} `{d}`" for d, name in sorted(shipped.items(), key=lambda x: x[1])) + ".",
           "",
           "Folder names: `eval/<model>[-<tasks>]-<group rule>-rerank<r>-n<prompts per task>[-suite1]` (`oracle` instead of",
           "the policy for an oracle-only run; `suite1`: the suite before the 2026-12-02 prompt fix, whose `hotpotqa` and",
           "`code_completion` prompts changed with `--samples`), `recall/<model>-<bits>bit-<group rule>`, `bench/<configs>`.",
           ""]
    current = [r for r in runs if DOCS / "archive" not in r.parents]
    archive = [r for r in runs if DOCS / "archive" in r.parents]
    described = {r: describe(r, shipped) for r in runs}
    for title, group, intro in (
            ("Current runs", current, "These measure the shipped encoders (or, for `bench`, the shipped encoders' configuration)."),
            ("Archive", archive, "These measure earlier encoders, no longer shipped (the first 64-bit SmolLM2 and 128-bit "
                                 "Gemma encoders, and the first encoders of the learned-hashing recipe: 64-bit SmolLM2, "
                                 "128-bit Gemma). Kept for the record; their numbers do not describe the package today.")):
        out += [f"## {title}", "", intro, "", "| run | date | commit | encoders |", "|---|---|---|---|"]
        for r in group:
            f, _ = described[r]
            rel = r.relative_to(DOCS).as_posix()
            out.append(f"| [{rel}](#{anchor(rel)}) | {f['date']} | {f['commit']} | {f['encoders'].replace('|', '/')} |")
        out.append("")
        for r in group:
            out += described[r][1]
    (DOCS / "README.md").write_text("\n".join(out).rstrip("\n") + "\n")


def anchor(rel: str) -> str:
    """GitHub's anchor for a heading '### [rel](rel/)' (its text is rel): lower case, punctuation but '-' dropped."""
    return re.sub(r"[^\w\- ]", "", rel).lower().replace(" ", "-")


if __name__ == "__main__":
    main()
