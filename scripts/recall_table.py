"""The README's recall table: SmolLM2, 3,000-token prompt, budget 1/32, untrained encoders, sum vs min.

Run: python scripts/recall_table.py
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402

from hf_dashkv import DashKVCache, DashKVConfig, HashEncoders  # noqa: E402
from hf_dashkv.demo import passkey_prompt  # noqa: E402
from hf_dashkv.models import load_model  # noqa: E402
from hf_dashkv.recall import attention_recall  # noqa: E402


def mean_recall(model, ids, **overrides) -> float:
    config = DashKVConfig(**{"budget": 1 / 32, "dense_layers": (0, 1, 28, 29), "query_hidden": 0, **overrides})
    cache = DashKVCache(model.config, HashEncoders.random(model.config, config, seed=0), config)
    return statistics.mean(attention_recall(model, ids, cache, decode_steps=8).values())


def main() -> None:
    model, tokenizer = load_model()
    ids = tokenizer(passkey_prompt(tokenizer, 3000).text, return_tensors="pt").input_ids
    print("| bits | `group_reduce=\"sum\"` | `group_reduce=\"min\"` |\n|---:|---:|---:|")
    for bits in (32, 64, 128):
        sums, mins = (mean_recall(model, ids, bits=bits, group_reduce=r) for r in ("sum", "min"))
        print(f"| {bits} | {sums:.3f} | {mins:.3f} |")
    print(f"\nSinks + recent window alone (budget 1): {mean_recall(model, ids, bits=64, budget=1):.3f}")


if __name__ == "__main__":
    main()
