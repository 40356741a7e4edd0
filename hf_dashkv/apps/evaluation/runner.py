"""Run every method on the same prompts, in one process, from one shared prefill; write predictions as JSONL.

Prefill is exact whatever the method (DASH-KV and its baselines only change decode steps), so each prompt is
prefilled once and every method decodes from a fork of that cache (:meth:`DashKVCache.fork`). All methods go
through the same cache and attention path and differ only in their selector (``hf_dashkv.selectors``):

- ``full``: exact attention (``DenseSelector``);
- ``dashkv``: the trained encoders; ``random``: untrained random-projection hashing (``HashEncoders.random``);
- ``streaming``, ``quest``, ``oracle``: the training-free baselines and the ceiling.

Per prompt and method (docs/design.md §4, against ``full`` on the same prompt):
- the greedy answer and its task score;
- teacher-forced along full attention's greedy answer: next-token KL(full || method) and greedy-token agreement at
  each decode step (and how many steps were compared), and the attention recall of every hashed layer at those steps;
- the negative log-likelihood of the reference continuation (gold answer, or held-out text), one decode step per
  token.

A prompt is finished when all its (method, budget) records are in the predictions file; a rerun skips those, so an
interrupted run resumes where it stopped. A prompt that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..bench import budget_label
from ...cache import DashKVCache
from ...compat import with_cache
from ...encoders import HashEncoders
from ...policy import DecodePolicy
from ...selectors import DenseSelector, OracleSelector, QuestSelector, Selector, StreamingSelector
from ...recall import measuring_recall
from .metrics import score
from .sample import Sample

METHODS = ("full", "dashkv", "random", "streaming", "quest", "oracle")
_BASELINES = {"full": DenseSelector, "streaming": StreamingSelector, "quest": QuestSelector, "oracle": OracleSelector}


@dataclass(frozen=True)
class Setup:
    """One method at one budget: what ``DashKVCache.fork`` needs (``selector``: ``None`` for the hash methods)."""

    method: str
    budget: str
    encoders: HashEncoders | None
    policy: DecodePolicy
    selector: Selector | None = None

    def fork(self, cache: DashKVCache) -> DashKVCache:
        return cache.fork(self.encoders, self.policy, self.selector)


def setups(model_config, encoders: HashEncoders, methods: list[str], budgets: list[int | float],
           base: DecodePolicy | None = None, rerank: int | None = None) -> list[Setup]:
    """``full`` once, then every other method at every budget, all with ``base``'s windows and dense layers.

    ``base`` defaults to the encoders' recommended policy. ``rerank`` applies to the hash methods (``dashkv``,
    ``random``): their codes shortlist ``rerank x budget`` keys and exact scores keep the budget (the other selectors
    have no codes to re-rank); ``None``: ``base``'s.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}.")
    base = base or encoders.policy or DecodePolicy()
    rerank = base.rerank if rerank is None else rerank
    random_encoders = (HashEncoders.random(model_config, encoders.config, encoders.layout.dense_layers, seed=0)
                       if "random" in methods else None)
    # full attention and the baselines have no hash codes: no re-ranking, no learned terms
    baseline = replace(base, rerank=1, tier2_budget=0, spatial_calibration=False, temporal_calibration=False)
    out = [Setup("full", "-", None, baseline, DenseSelector())]
    for budget in budgets:
        for method in methods:
            if method == "full":
                continue
            label = "-" if method == "streaming" else budget_label(budget)
            if any(s.method == method and s.budget == label for s in out):
                continue  # streaming has no budget: once is enough
            if method in _BASELINES:
                out.append(Setup(method, label, None, replace(baseline, budget=budget), _BASELINES[method]()))
            else:
                chosen = encoders if method == "dashkv" else random_encoders
                out.append(Setup(method, label, chosen, replace(base, budget=budget, rerank=rerank)))
    return out


class Evaluator:
    """Runs :func:`setups` on samples with one model and tokenizer.

    Args:
        model: a causal LM loaded with ``attn_implementation="dashkv"``.
        setups: from :func:`setups`; the first must be ``full``.
        prefill_chunk: prompt tokens per prefill forward pass (bounds the memory of long prompts).
    """

    def __init__(self, model, tokenizer, setups: list[Setup], prefill_chunk: int = 2048):
        if not setups or setups[0].method != "full":
            raise ValueError("the first setup must be 'full': every other method is compared with it.")
        self.model, self.tokenizer, self.setups, self.prefill_chunk = model, tokenizer, setups, prefill_chunk
        self.eos: set[int] = set()
        for ids in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            self.eos.update(ids if isinstance(ids, list) else [] if ids is None else [ids])  # an int, a list or None

    @torch.inference_mode()
    def run_sample(self, sample: Sample, only: set[tuple[str, str]] | None = None) -> list[dict]:
        """Records of one sample for every setup (or only those in ``only``: ``(method, budget)`` pairs)."""
        ids = self.tokenizer(sample.prompt, return_tensors="pt").input_ids
        full = self.setups[0]
        base = DashKVCache(self.model.config, None, full.policy, full.selector)
        first = self._prefill(ids, base)
        reference, reference_logprobs = self._greedy(full.fork(base), first, sample)
        continuation = sample.continuation if sample.continuation is not None else (
            " " + sample.answers[0] if sample.answers else None)
        target = self.tokenizer(continuation, add_special_tokens=False).input_ids if continuation else []
        full_text = self._text(reference, sample)
        records = []
        for setup in self.setups:
            if only is not None and (setup.method, setup.budget) not in only:
                continue
            start = time.perf_counter()
            record = dict(_identity(sample), method=setup.method, budget=setup.budget, prompt_tokens=ids.shape[1],
                          answers=sample.answers, error=None)
            if setup.method == "full":
                tokens, fidelity = reference, {"kl": 0.0, "agreement": 1.0, "steps": max(len(reference) - 1, 0),
                                               "recall": {}}
            else:
                fidelity = self._fidelity(setup.fork(base), reference, reference_logprobs)
                tokens = reference
                if fidelity["agreement"] is not None and fidelity["agreement"] < 1.0:
                    tokens, _ = self._greedy(setup.fork(base), first, sample)
            prediction = self._text(tokens, sample)
            nll = self._nll(setup.fork(base), first, target) if target else None
            references = sample.answers or [full_text]
            record.update(
                prediction=prediction,
                score=score(sample.metric, prediction, references, sample.all_classes, sample.task)
                if sample.metric else None,
                nll=nll, nll_tokens=len(target), seconds=round(time.perf_counter() - start, 3), **fidelity,
            )
            records.append(record)
        return records

    def _prefill(self, ids: torch.Tensor, cache: DashKVCache) -> torch.Tensor:
        """Exact prefill in chunks; log-probabilities of the next token, ``[V]``."""
        for start in range(0, ids.shape[1], self.prefill_chunk):
            out = self.model(ids[:, start : start + self.prefill_chunk], **with_cache(cache), logits_to_keep=1)
        return out.logits[0, -1].float().log_softmax(-1)

    def _step(self, cache: DashKVCache, token: int) -> torch.Tensor:
        out = self.model(torch.tensor([[token]]), **with_cache(cache))
        return out.logits[0, -1].float().log_softmax(-1)

    def _greedy(self, cache: DashKVCache, first: torch.Tensor, sample: Sample) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy tokens (the stopping token included) and the log-probabilities each was chosen from."""
        tokens, logprobs, current = [], [], first
        for _ in range(sample.max_new_tokens):
            token = int(current.argmax())
            tokens.append(token)
            logprobs.append(current)
            if token in self.eos or (sample.stop_at_newline and "\n" in self._decoded(tokens).lstrip()):
                break
            current = self._step(cache, token)
        return tokens, logprobs

    def _fidelity(self, cache: DashKVCache, reference: list[int], reference_logprobs: list[torch.Tensor]) -> dict:
        """Teacher-forced along full attention's answer: mean KL(full || method), agreement, recall per layer.

        The first answer token comes from the (shared, exact) prefill, so the comparison starts at the second;
        ``steps`` is how many tokens were compared (what pooling the agreement over tokens weighs by).
        """
        if len(reference) < 2:
            return {"kl": None, "agreement": None, "steps": 0, "recall": {}}
        kls, agree = [], []
        with measuring_recall(cache) as meter:
            for position, token in enumerate(reference[:-1]):
                mine, theirs = self._step(cache, token), reference_logprobs[position + 1]
                kls.append(float((theirs.exp() * (theirs - mine)).sum()))
                agree.append(int(mine.argmax()) == reference[position + 1])
            recall = {str(layer): round(value, 5) for layer, value in meter.per_layer().items()}
        return {"kl": sum(kls) / len(kls), "agreement": sum(agree) / len(agree), "steps": len(agree),
                "recall": recall}

    def _nll(self, cache: DashKVCache, first: torch.Tensor, target: list[int]) -> float:
        """Mean negative log-likelihood of ``target`` after the prompt, one decode step per token."""
        total, current = 0.0, first
        for position, token in enumerate(target):
            total -= float(current[token])
            if position + 1 < len(target):
                current = self._step(cache, token)
        return total / len(target)

    def _decoded(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _text(self, tokens: list[int], sample: Sample) -> str:
        text = self._decoded(tokens).strip()
        return text.split("\n")[0].strip() if sample.stop_at_newline else text


def _identity(sample: Sample) -> dict:
    """The fields every record of ``sample`` starts with (what the report groups by, and resume keys on)."""
    return dict(task=sample.task, context_tokens=sample.context_tokens, sample_id=sample.sample_id, key=sample.key,
                prompt_sha=prompt_digest(sample))


def prompt_digest(sample: Sample) -> str:
    """A digest of the prompt, so that a record is never taken for another prompt under the same key."""
    return hashlib.sha256(sample.prompt.encode()).hexdigest()[:16]


def stale(record: dict, digests: dict[str, str]) -> bool:
    """Whether ``record`` was made for another prompt than the one its key names now (``digests``: key -> digest
    of this run's samples). Records written before digests were kept cannot tell, and count as current."""
    return "prompt_sha" in record and record["key"] in digests and record["prompt_sha"] != digests[record["key"]]


def completed(path: Path, digests: dict[str, str] | None = None) -> dict[str, set[tuple[str, str]]]:
    """``{sample key: {(method, budget), ...}}`` of the error-free records in the predictions file ``path``, not
    counting :func:`stale` ones."""
    done: dict[str, set[tuple[str, str]]] = {}
    if path.exists():
        for record in read_records(path):
            if record.get("error") is None and not stale(record, digests or {}):
                done.setdefault(record["key"], set()).add((record["method"], record["budget"]))
    return done


def read_records(path: Path) -> list[dict]:
    """Every record of a predictions file; a last line cut short by a kill is ignored."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_identity(evaluator: Evaluator, facts: dict | None = None) -> dict:
    """What makes two runs' records comparable: the model, ``facts`` (e.g. the suite's seed) and, per method and
    budget, the decode policy, the selector and a digest of the encoders' weights. JSON-ready."""
    def encoders_digest(encoders: HashEncoders | None) -> str | None:
        if encoders is None:
            return None
        digest = hashlib.sha256()
        for name, tensor in sorted(encoders.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    identity = {
        "model": Path(evaluator.model.config.name_or_path).name,  # a name, not this machine's path
        **(facts or {}),
        "setups": {f"{s.method} {s.budget}": {"policy": asdict(s.policy), "selector": repr(s.selector),
                                              "encoders": encoders_digest(s.encoders)}
                   for s in evaluator.setups},
    }
    return json.loads(json.dumps(identity))  # tuples as lists, as they read back


def claim_out_dir(predictions: Path, identity: dict) -> None:
    """Refuse to add to ``predictions`` records of another setup (they would be reported as one run); otherwise
    record this run's identity beside it (``setup.json``), merged with the setups already there."""
    file = predictions.with_name("setup.json")
    if file.exists():
        old = json.loads(file.read_text())
    elif predictions.exists() and predictions.stat().st_size:
        old = {"setups": {}, "model": "(unrecorded: written before setup.json existed)"}
    else:
        old = None
    if old is not None:
        clashes = [name for name in sorted(set(old) | set(identity))
                   if name != "setups" and old.get(name) != identity.get(name)]
        clashes += [label for label, value in identity["setups"].items() if old["setups"].get(label, value) != value]
        if clashes:
            raise ValueError(
                f"{predictions.parent} holds results of another setup (it differs in {clashes}), which would be "
                f"reported as this run's. Use another --out-dir, or delete {predictions.name} and {file.name} there "
                "to start over."
            )
        identity = {**identity, "setups": {**old["setups"], **identity["setups"]}}
    file.write_text(json.dumps(identity, indent=1))


def evaluate(evaluator: Evaluator, samples: list[Sample], predictions: Path, facts: dict | None = None) -> list[dict]:
    """Run ``samples`` not yet finished in ``predictions`` (JSONL, appended to), with a progress bar.

    ``facts``: what else defines the run beside the model, methods, configs and encoders (e.g. the suite's seed);
    a folder holding another setup's records is refused (:func:`claim_out_dir`). A sample counts as finished only
    with records of its current prompt (:func:`stale`). Returns the records of this run's methods and budgets in the
    file afterwards (earlier, interrupted runs of the same setup included; stale ones left out).
    """
    from tqdm import tqdm

    predictions.parent.mkdir(parents=True, exist_ok=True)
    claim_out_dir(predictions, run_identity(evaluator, facts))
    wanted = {(s.method, s.budget) for s in evaluator.setups}
    digests = {s.key: prompt_digest(s) for s in samples}
    have = completed(predictions, digests)
    todo = [s for s in samples if not wanted <= have.get(s.key, set())]
    if len(todo) < len(samples):
        print(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples already finished in {predictions}")
    with open(predictions, "a", encoding="utf-8") as handle, tqdm(todo, desc="dashkv eval", unit="sample") as bar:
        if handle.tell() and not predictions.read_bytes().endswith(b"\n"):
            handle.write("\n")  # a killed run can leave half a line: new records start on their own line
        for sample in bar:
            bar.set_postfix_str(f"{sample.task} @ {sample.context_tokens}")
            missing = wanted - have.get(sample.key, set())
            try:
                records = evaluator.run_sample(sample, only=missing)
            except Exception as error:  # one bad sample must not end a long run: record it and go on
                records = [dict(_identity(sample), method="*", budget="*", error=f"{type(error).__name__}: {error}",
                                traceback=traceback.format_exc(limit=3))]
                bar.write(f"failed: {sample.key}: {records[0]['error']}")
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
    return [r for r in read_records(predictions)
            if ((r["method"], r["budget"]) in wanted or r["method"] == "*") and not stale(r, digests)]

