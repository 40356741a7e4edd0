"""Ship trained encoders of an embedded model inside the package, with the sandwich chosen from measured recall.

Run after `lightning fit --config recipes/smollm2.yaml` (its ExportEncoders callback writes runs/smollm2/encoders):
    python scripts/ship_encoders.py runs/smollm2/encoders
    python scripts/ship_encoders.py runs/gemma3/encoders --model gemma3-270m --max-dense 0

The choice uses the training's own validation measure, kept in the exported training.json: R@8|B per layer over
the candidates, on held-out blocks of the training sources (documents the training never saw). The layers with the
lowest trained R@8 (at most --max-dense, and only below --threshold) are left dense. Writes
hf_dashkv/assets/encoders/<model>/ with a model card. The out-of-domain numbers come from `dashkv recall` afterwards.
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

from hf_dashkv import HashEncoders
from hf_dashkv.apps.models import EMBEDDED_MODELS
from lightning_modules.export import export, with_dense_layers

ASSETS = Path(__file__).resolve().parents[1] / "hf_dashkv" / "assets" / "encoders"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exported", help="the folder ExportEncoders wrote at the end of fit")
    parser.add_argument("--model", default="smollm2-135m", help="the embedded model the encoders are for")
    parser.add_argument("--max-dense", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.8, help="only layers below this R@8 go dense")
    parser.add_argument("--group-reduce", choices=["sum", "min"], default=None,
                        help="the decode policy users get by default: how a GQA group combines code distances")
    parser.add_argument("--rerank", type=int, default=None, help="the default re-ranking factor (1: off)")
    args = parser.parse_args()

    folder = Path(args.exported)
    trained = HashEncoders.from_pretrained(folder)
    facts = json.loads((folder / "training.json").read_text())
    recall = {int(layer): values for layer, values in (facts.get("recall") or {}).items()}
    if not recall:
        raise SystemExit(f"{folder}/training.json has no validation recall: run fit with validation on.")
    lowest = sorted(recall, key=lambda layer: recall[layer]["trained"])[: args.max_dense]
    dense = sorted(layer for layer in lowest if recall[layer]["trained"] < args.threshold)
    dense = sorted({*trained.config.resolve_dense_layers(trained.layout.num_layers), *dense})
    facts.update(
        base_model=f"{args.model} (embedded: {EMBEDDED_MODELS[args.model].pip_args.split()[-1]})",
        notes=(f"dense layers {dense}: the layers with the lowest validation R@8|B (at most {args.max_dense}, below "
               f"{args.threshold}) run full attention"),
    )
    policy = {name: value for name, value in (("group_reduce", args.group_reduce), ("rerank", args.rerank))
              if value is not None}
    trained.config = replace(trained.config, **policy)  # validated: DashKVConfig refuses a bad combination
    shipped = with_dense_layers(trained, dense)  # a new HashEncoders: its saved config.json carries the policy
    if policy:
        facts["notes"] += f"; decode policy {policy} (measured with `dashkv eval` / `dashkv recall`, README)"
    out = export(shipped, facts, ASSETS / args.model)
    print(f"wrote {out}; {facts['notes']}\n\n| layer | trained R@8 | SimHash R@8 |\n|---:|---:|---:|")
    for layer in sorted(recall):
        print(f"| {layer}{' (dense)' if layer in dense else ''} | {recall[layer]['trained']:.3f} | "
              f"{recall[layer]['random']:.3f} |")


if __name__ == "__main__":
    main()
