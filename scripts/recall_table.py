"""The README's recall tables on SmolLM2 (3,000-token passkey prompt, budget 1/32, 8 decode steps):
how a GQA group shares its selection (untrained encoders, "sum" vs "min"), and every selector side by side.

Run: python scripts/recall_table.py
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
from dataclasses import replace  # noqa: E402

from hf_dashkv import DashKVCache, DashKVConfig, HashEncoders  # noqa: E402
from hf_dashkv.apps.models import shipped_encoders  # noqa: E402
from hf_dashkv.apps.demo import passkey_prompt  # noqa: E402
from hf_dashkv.apps.models import load_model  # noqa: E402
from hf_dashkv.recall import attention_recall  # noqa: E402

SANDWICH = (0, 1, 28, 29)


def mean_recall(model, ids, encoders=None, **overrides) -> float:
    base = DashKVConfig(budget=1 / 32, dense_layers=SANDWICH, query_hidden=0)
    if encoders is not None:
        base = replace(encoders.config, budget=1 / 32)
    config = replace(base, **overrides)
    if encoders is None and config.selector == "hash":
        encoders = HashEncoders.random(model.config, config, seed=0)
    cache = DashKVCache(model.config, encoders, config)
    return statistics.mean(attention_recall(model, ids, cache, decode_steps=8).values())


def main() -> None:
    model, tokenizer = load_model()
    ids = tokenizer(passkey_prompt(tokenizer, 3000).text, return_tensors="pt").input_ids
    print("| bits | `group_reduce=\"sum\"` | `group_reduce=\"min\"` |\n|---:|---:|---:|")
    for bits in (32, 64, 128):
        sums, mins = (mean_recall(model, ids, bits=bits, group_reduce=r) for r in ("sum", "min"))
        print(f"| {bits} | {sums:.3f} | {mins:.3f} |")

    trained = HashEncoders.from_pretrained(str(shipped_encoders("smollm2-135m")))
    dense = list(trained.config.dense_layers)
    print(f"\nSelectors at budget 1/32 + 4 sinks + 64 recent, dense layers {dense} (those of the shipped encoders)\n")
    print("| selector | mean recall |\n|---|---:|")
    rows = {
        "DASH-KV, shipped trained encoders (64 bits)": dict(encoders=trained),
        "random projections (untrained, 64 bits)": dict(bits=64, dense_layers=tuple(dense)),
        "oracle (exact scores)": dict(selector="oracle", dense_layers=tuple(dense)),
        "Quest (pages of 16)": dict(selector="quest", dense_layers=tuple(dense)),
        "StreamingLLM (sinks + recent only)": dict(selector="streaming", dense_layers=tuple(dense)),
    }
    for name, kwargs in rows.items():
        print(f"| {name} | {mean_recall(model, ids, **kwargs):.3f} |")


if __name__ == "__main__":
    main()
