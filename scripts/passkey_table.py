"""Passkey retrieval accuracy per selector at the same budget: a task-level check beside recall.

A passkey is planted at several depths of held-out State of the Union text; each method answers greedily, and
counts as right when its answer contains the passkey. Every method runs in this process, on the same prompts:
full attention, DASH-KV with the shipped trained encoders, untrained random projections, oracle, Quest and
StreamingLLM, all at budget 1/32 + 4 sinks + 64 recent.

Run: python scripts/passkey_table.py --model gemma3-270m --contexts 1024 2048 4096
"""

import argparse
import os
from dataclasses import replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from hf_dashkv import DashKVCache, HashEncoders, with_cache  # noqa: E402
from hf_dashkv.apps.models import shipped_encoders  # noqa: E402
from hf_dashkv.apps.demo import passkey_prompt  # noqa: E402
from hf_dashkv.apps.models import load_model  # noqa: E402

PASSKEYS = ["71432", "90210", "38517", "62094", "15873", "47261"]
DEPTHS = [0.1, 0.25, 0.4, 0.55, 0.7, 0.9]


def caches(model, name: str, budget: float):
    """One cache factory per method, all at the same budget (the trained encoders' own bits and layers)."""
    trained = HashEncoders.from_pretrained(str(shipped_encoders(name)))
    base = replace(trained.config, budget=budget)
    random = HashEncoders.random(model.config, base, seed=0)
    return {
        "full": lambda: DynamicCache(config=model.config),
        "dashkv": lambda: DashKVCache(model.config, trained, base),
        "random": lambda: DashKVCache(model.config, random, base),
        "oracle": lambda: DashKVCache(model.config, config=replace(base, selector="oracle")),
        "quest": lambda: DashKVCache(model.config, config=replace(base, selector="quest")),
        "streaming": lambda: DashKVCache(model.config, config=replace(base, selector="streaming")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--budget", type=float, default=1 / 32)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    methods = caches(model, args.model, args.budget)
    right = {(name, n): 0 for name in methods for n in args.contexts}
    jobs = [(n, key, depth) for n in args.contexts for key, depth in zip(PASSKEYS, DEPTHS)]
    for n, key, depth in tqdm(jobs, desc="passkeys"):
        prompt = passkey_prompt(tokenizer, n, passkey=key, depth=depth)
        ids = tokenizer(prompt.text, return_tensors="pt")
        for name, make in methods.items():
            with torch.inference_mode():
                out = model.generate(**ids, **with_cache(make()), max_new_tokens=8, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            right[(name, n)] += key in tokenizer.decode(out[0, ids.input_ids.shape[1]:])
    header = " | ".join(f"{n // 1024}k" for n in args.contexts)
    print(f"\n{args.model}, passkey accuracy (of {len(PASSKEYS)}), budget 1/{round(1 / args.budget)}\n")
    print(f"| method | {header} |\n|---|" + "---:|" * len(args.contexts))
    for name in methods:
        print(f"| {name} | " + " | ".join(f"{right[(name, n)]}/{len(PASSKEYS)}" for n in args.contexts) + " |")


if __name__ == "__main__":
    main()
