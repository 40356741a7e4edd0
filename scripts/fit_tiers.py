"""Fit DASH-KV's optional terms (the tier-2 logit, spatial and temporal calibration) for an embedded model's
shipped encoders, and print what each one does on held-out text (arXiv 2604.19351, "keep them only if they help").

Fitting reads a few State of the Union speeches (``hf_dashkv.apps.demo.sotu_speeches``); the ablation reads the demo's
own speeches (``sotu_text``), which fitting never sees. Both at budget 1/32 (+ 4 sinks + 64 recent) and, for
tier 2, the next 1/32; the last row (twice the budget, all exact) is what a perfect tier-2 logit would give.
``--write`` saves the fitted terms into the shipped encoders, only those that helped (the others stay
neutral); the shipped config keeps them off, so nothing changes until a config turns them on.

Run: python scripts/fit_tiers.py --model smollm2-135m [--write]
"""

import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from hf_dashkv import HashEncoders  # noqa: E402
from hf_dashkv.apps.models import shipped_encoders  # noqa: E402
from hf_dashkv.apps.demo import sotu_speeches, sotu_text  # noqa: E402
from hf_dashkv.encoders import Tier2Terms  # noqa: E402
from hf_dashkv.apps.models import load_model  # noqa: E402
from lightning_modules.calibration import capture, evaluate, fit_tiers  # noqa: E402

BUDGET = 1 / 32


def token_windows(tokenizer, texts, count: int, length: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` tokens: the start of each text long enough, or spread over one text."""
    ids = [tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]
    if len(ids) == 1:
        starts = torch.linspace(0, len(ids[0]) - length, count).long().tolist()
        return [ids[0][s : s + length] for s in starts]
    return [t[:length] for t in ids if len(t) >= length][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fit-sequences", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence, fitting and evaluation")
    parser.add_argument("--positions", type=int, default=24, help="decode-like positions per sequence")
    parser.add_argument("--write", action="store_true", help="save the terms that helped into the shipped encoders")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    start = time.perf_counter()

    model, tokenizer = load_model(args.model)
    folder = shipped_encoders(args.model)
    if folder is None:
        raise SystemExit(f"{args.model} has no shipped encoders; see hf_dashkv/assets/encoders.")
    encoders = HashEncoders.from_pretrained(str(folder))
    # the encoders' own bits, layers, sinks and window; every optional term off, as shipped
    base = replace(encoders.config, budget=BUDGET, tier2_budget=0, spatial_calibration=False,
                   temporal_calibration=False)
    every = replace(base, tier2_budget=BUDGET, spatial_calibration=True, temporal_calibration=True)

    # the first speeches, in file order: a fixed, reproducible choice that never includes the demo's
    fit_ids = token_windows(tokenizer, sotu_speeches()[: 4 * args.fit_sequences], args.fit_sequences, args.tokens)
    fitted = fit_tiers(model, encoders, fit_ids, every, positions=args.positions)
    print(f"fitted on {len(fit_ids)} x {args.tokens} tokens in {time.perf_counter() - start:.0f} s", flush=True)

    layers = fitted.layout.hashed_layers
    held_out = [capture(model, ids.view(1, -1), layers, args.positions)
                for ids in token_windows(tokenizer, [sotu_text()], args.eval_windows, args.tokens)]
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
    print(f"\n{args.model}, held-out demo speeches: {len(held_out)} x {args.tokens} tokens, {steps} decode-like "
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
    if args.write:
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


if __name__ == "__main__":
    main()
