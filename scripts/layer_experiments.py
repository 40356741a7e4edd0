"""Quick recipe experiments on a few layers: train DashKVDistillation on them alone, then probe held-out recall.

The SmolLM2 recipe trains all 30 layers on 2 processes (~40 min here); the loss of each layer is independent, so
training 4 weak layers in one process (batch 2: the recipe's two ranks' blocks) answers "does this setting help?"
in ~6 minutes. Each run appends one JSON line (setting, train seconds, R@1 / R@8 per context, R@8 per layer) to
--out; the measure is `dashkv recall`'s (held-out essays, last 32 positions of 4 sequences, budget 1/32,
candidates only).

    python scripts/layer_experiments.py --name base
    python scripts/layer_experiments.py --name mlp64 --set '{"query_hidden": 64}'
    python scripts/layer_experiments.py --name top128 --set '{"teacher_top": 128}'
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import lightning as L

from hf_dashkv.apps.models import load_model
from hf_dashkv.apps.probe import probe, probe_sequences
from lightning_modules import DashKVDistillation, LongTextDataModule

RECIPE = dict(model="smollm2-135m", bits=128, query_hidden=0, budget=1 / 32, teacher_top=32, lr=0.01)
DATA = dict(sources=["sotu", "hotpotqa", "stdlib"], tokenizer="smollm2-135m", seq_len=4096, batch_size=2,
            val_documents=8, max_train_blocks=12, max_val_blocks=2, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[13, 16, 20, 24], help="the recipe's weakest")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", default="{}", help="JSON of DashKVDistillation arguments over the recipe's")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096])
    parser.add_argument("--out", default="runs/layer_experiments.jsonl")
    args = parser.parse_args()

    L.seed_everything(0)
    settings = {**RECIPE, **json.loads(args.set)}
    model_name = settings["model"]
    dense = [i for i in range(load_model(model_name)[0].config.num_hidden_layers) if i not in args.layers]
    module = DashKVDistillation(dense_layers=dense, **settings)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                        use_distributed_sampler=False)
    start = time.time()
    trainer.fit(module, datamodule=LongTextDataModule(**{**DATA, "tokenizer": model_name}))
    result = {"name": args.name, "settings": settings, "steps": args.steps, "train_s": round(time.time() - start)}
    model, tokenizer = load_model(model_name)
    config = replace(module.encoders.config, budget=settings["budget"])
    for length in args.contexts:
        table = probe(model, module.encoders, probe_sequences(tokenizer, "essays", length, 4), config, 32,
                      methods=("trained",))
        summary = table.summary("trained")
        result[f"{length // 1024}k"] = {"R@1": round(summary["R@1"], 3), "R@8": round(summary["R@8"], 3),
                                        "layers R@8": {i: round(table.layer("trained", i)["R@8"], 3)
                                                       for i in args.layers}}
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
