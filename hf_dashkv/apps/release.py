"""Release steps for the encoders that ship inside the package: ``dashkv ship`` and ``dashkv fit-terms``.

``dashkv ship EXPORTED``: after ``dashkv fit --config recipes/smollm2.yaml`` (its ExportEncoders callback writes
runs/smollm2/encoders), ship those encoders of an embedded model inside the package, with the sandwich chosen from
measured recall:
    dashkv ship runs/smollm2/encoders
    dashkv ship runs/gemma3/encoders --model gemma3-270m --max-dense 0
The choice uses the training's own validation measure, kept in the exported training.json: R@8|B per layer over
the candidates, on held-out blocks of the training sources (documents the training never saw). The layers with the
lowest trained R@8 (at most --max-dense, and only below --threshold) are left dense. Writes
hf_dashkv/assets/encoders/<model>/ with a model card. The out-of-domain numbers come from `dashkv recall` afterwards.

``dashkv fit-terms``: fit DASH-KV's optional terms (the tier-2 logit, spatial and temporal calibration) for an
embedded model's shipped encoders, and print what each one does on held-out text (arXiv 2604.19351, "keep them
only if they help"). Fitting reads a few State of the Union speeches (``hf_dashkv.corpora.sotu_speeches``); the
ablation reads the demo's own speeches (``sotu_text``), which fitting never sees. Both at budget 1/32 (+ 4 sinks +
64 recent) and, for tier 2, the next 1/32; the last row (twice the budget, all exact) is what a perfect tier-2 logit
would give. ``--write`` saves the fitted terms into the shipped encoders, only those that helped (the others stay
neutral); the recommended policy keeps them off, so nothing changes until a policy turns them on.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import DecodePolicy, HashEncoders
from ..corpora import sotu_speeches, sotu_text
from ..embedded import EMBEDDED_MODELS, load_model, shipped_encoders
from ..encoders import Tier2Terms
from ..hub import export, with_dense_layers

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "encoders"
BUDGET = 1 / 32


def ship(exported: str, model: str = "smollm2-135m", max_dense: int = 4, threshold: float = 0.8,
         group_reduce: str | None = None, rerank: int | None = None) -> None:
    """Write the exported encoders into ``hf_dashkv/assets/encoders/<model>/``, the lowest-recall layers dense."""
    folder = Path(exported)
    trained = HashEncoders.from_pretrained(folder)
    facts = json.loads((folder / "training.json").read_text())
    recall = {int(layer): values for layer, values in (facts.get("recall") or {}).items()}
    if not recall:
        raise SystemExit(f"{folder}/training.json has no validation recall: run fit with validation on.")
    lowest = sorted(recall, key=lambda layer: recall[layer]["trained"])[:max_dense]
    dense = sorted(layer for layer in lowest if recall[layer]["trained"] < threshold)
    dense = sorted({*trained.layout.dense_layers, *dense})
    facts.update(
        base_model=f"{model} (embedded: {EMBEDDED_MODELS[model].pip_args.split()[-1]})",
        notes=(f"dense layers {dense}: the layers with the lowest validation R@8|B (at most {max_dense}, below "
               f"{threshold}) run full attention"),
    )
    policy = {name: value for name, value in (("group_reduce", group_reduce), ("rerank", rerank))
              if value is not None}
    # validated: DecodePolicy refuses a bad combination; saved as decode_policy.json, the recommended policy
    trained.policy = replace(trained.policy or DecodePolicy(), **policy)
    shipped = with_dense_layers(trained, dense)
    if policy:
        facts["notes"] += f"; decode policy {policy} (measured with `dashkv eval` / `dashkv recall`, README)"
    out = export(shipped, facts, ASSETS / model)
    print(f"wrote {out}; {facts['notes']}\n\n| layer | trained R@8 | SimHash R@8 |\n|---:|---:|---:|")
    for layer in sorted(recall):
        print(f"| {layer}{' (dense)' if layer in dense else ''} | {recall[layer]['trained']:.3f} | "
              f"{recall[layer]['random']:.3f} |")


def token_windows(tokenizer, texts, count: int, length: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` tokens: the start of each text long enough, or spread over one text."""
    ids = [tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]
    if len(ids) == 1:
        starts = torch.linspace(0, len(ids[0]) - length, count).long().tolist()
        return [ids[0][s : s + length] for s in starts]
    return [t[:length] for t in ids if len(t) >= length][:count]


def fit_terms(model_name: str = "smollm2-135m", fit_sequences: int = 4, eval_windows: int = 3, tokens: int = 2048,
              positions: int = 24, write: bool = False) -> None:
    """Fit the optional terms of ``model_name``'s shipped encoders, print the ablation, and save what helped."""
    # imported here, not above: `dashkv ship` runs without the training extras
    from lightning_modules.calibration import capture, evaluate, fit_tiers

    torch.set_grad_enabled(False)
    start = time.perf_counter()

    model, tokenizer = load_model(model_name)
    folder = shipped_encoders(model_name)
    if folder is None:
        raise SystemExit(f"{model_name} has no shipped encoders; see hf_dashkv/assets/encoders.")
    encoders = HashEncoders.from_pretrained(str(folder))
    # the encoders' recommended sinks, window and group rule; every optional term off, as shipped (the terms act on
    # what the codes select, so no re-ranking)
    base = replace(encoders.policy or DecodePolicy(), budget=BUDGET, rerank=1, tier2_budget=0,
                   spatial_calibration=False, temporal_calibration=False)
    every = replace(base, tier2_budget=BUDGET, spatial_calibration=True, temporal_calibration=True)

    # the first speeches, in file order: a fixed, reproducible choice that never includes the demo's
    fit_ids = token_windows(tokenizer, sotu_speeches()[: 4 * fit_sequences], fit_sequences, tokens)
    fitted = fit_tiers(model, encoders, fit_ids, every, positions=positions)
    print(f"fitted on {len(fit_ids)} x {tokens} tokens in {time.perf_counter() - start:.0f} s", flush=True)

    layers = fitted.layout.hashed_layers
    held_out = [capture(model, ids.view(1, -1), layers, positions)
                for ids in token_windows(tokenizer, [sotu_text()], eval_windows, tokens)]
    configs = {
        "plain": base,
        "+spatial": replace(base, spatial_calibration=True),
        "+temporal": replace(base, temporal_calibration=True),
        "+both": replace(base, spatial_calibration=True, temporal_calibration=True),
        "plain + tier 2": replace(base, tier2_budget=BUDGET),
        "+both + tier 2": every,
        "reference: budget 2/32, all exact": replace(base, budget=2 * BUDGET),
    }
    results = evaluate(fitted, held_out, configs)

    steps = sum(len(s.positions) for s in held_out)
    print(f"\n{model_name}, held-out demo speeches: {len(held_out)} x {tokens} tokens, {steps} decode-like "
          f"positions x {len(layers)} hashed layers; budget 1/32 + 4 sinks + 64 recent, tier 2 the next 1/32\n")
    print("| variant | tier-1 recall | mass on tier 1 + tier 2 | attention output rel. error |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['recall']:.4f} | {r['tiers_mass']:.4f} | {r['error']:.4f} |")
    spatial = torch.stack([fitted[i].calibration.spatial for i in layers])
    temporal = torch.stack([fitted[i].calibration.temporal for i in layers])
    print(f"\nfitted weights (distance units): spatial mean {spatial.mean():.2f} ({int((spatial > 0).sum())}/"
          f"{len(layers)} layers > 0), temporal mean {temporal.mean():.2f} ({int((temporal > 0).sum())}/{len(layers)})")

    helps = {
        "spatial": results["+spatial"]["recall"] > results["plain"]["recall"],
        "temporal": results["+temporal"]["recall"] > results["plain"]["recall"],
        "tier 2": results["plain + tier 2"]["error"] < results["plain"]["error"],
    }
    print(f"helps: {helps} ({time.perf_counter() - start:.0f} s in all)")
    if write:
        if not any(helps.values()):
            print("nothing helped: the shipped encoders are left as they are")
            return
        for i in layers:  # a term that did not help goes back to neutral (as if off)
            if not helps["spatial"]:
                fitted[i].calibration.spatial.zero_()
            if not helps["temporal"]:
                fitted[i].calibration.temporal.zero_()
            if not helps["tier 2"]:
                fitted[i].tier2.weight.copy_(Tier2Terms(fitted.layout.num_heads).weight)
        fitted.save_pretrained(folder)
        print(f"wrote {folder}")
