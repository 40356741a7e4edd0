"""The fused CPU kernel of a git revision against the working tree's, interleaved in one process.

`dashkv bench` compares DASH-KV with full attention; this compares two versions of `hf_dashkv/kernels.py` on the
same inputs (Llama-3-8B attention shape: 8 KV heads of 4 query heads, head dim 128, bf16, budget 1/32, 4 sinks,
64 recent), so a kernel change is judged by a side-by-side ratio rather than by runs minutes apart on a shared
machine. Times are medians of --repeats, each repetition running every variant once in turn.

    python scripts/kernel_ab.py --base HEAD~1
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, which reads it once

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from hf_dashkv import kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_kernels(revision: str):
    """``hf_dashkv/kernels.py`` as it was at ``revision``, imported under its own module name (own numba cache)."""
    source = subprocess.run(["git", "show", f"{revision}:hf_dashkv/kernels.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="kernel_ab_")) / "base_kernels.py"
    path.write_text(source)
    # a submodule of the installed package by name, so its relative imports (``from .selection``) resolve
    spec = importlib.util.spec_from_file_location("hf_dashkv.base_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def median_ms(calls: dict, repeats: int) -> dict:
    for call in calls.values():
        call()  # compile / warm up
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision whose kernels.py is the baseline")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 131072])
    parser.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rerank", type=int, default=2, help="also time re-ranking with this factor (1: skip)")
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    versions = {"base": load_kernels(args.base), "tree": kernels}
    batch, kv_heads, group, dim, sinks, recent = 1, 8, 4, 128, 4, 64
    generator = torch.Generator().manual_seed(0)
    print(f"base = {args.base}, tree = working tree; ms, median of {args.repeats}\n")
    print("| N | bits | step | base ms | tree ms | base / tree |\n|---:|---:|---|---:|---:|---:|")
    for n in args.contexts:
        for bits in args.bits:
            capacity, budget = n + 256, n // 32
            key = torch.randn(batch, kv_heads, capacity, dim, generator=generator).bfloat16()[:, :, :n]
            value = torch.randn(batch, kv_heads, capacity, dim, generator=generator).bfloat16()[:, :, :n]
            key_codes = torch.randint(0, 256, (batch, kv_heads, capacity, bits // 8), dtype=torch.uint8,
                                      generator=generator)[:, :, :n]
            query = torch.randn(batch, kv_heads * group, 1, dim, generator=generator).bfloat16()
            query_codes = torch.randint(0, 256, (batch, kv_heads, group, bits // 8), dtype=torch.uint8,
                                        generator=generator)
            first = torch.zeros(batch, dtype=torch.long)
            steps = {
                "select": lambda m: m.nearest_codes(query_codes, key_codes, first + sinks, n - recent, budget, "sum"),
                "decode": lambda m: m.decode_attention(query, query_codes, key, value, key_codes, first, sinks,
                                                       recent, budget, "sum", dim**-0.5),
            }
            if args.rerank > 1:
                steps[f"rerank {args.rerank}"] = lambda m: m.decode_attention(
                    query, query_codes, key, value, key_codes, first, sinks, recent, budget, "sum", dim**-0.5,
                    shortlist=args.rerank * budget)
            calls = {(step, name): (lambda f=f, m=m: f(m)) for step, f in steps.items() for name, m in versions.items()}
            ms = median_ms(calls, args.repeats)
            for step in steps:
                base, tree = ms[(step, "base")], ms[(step, "tree")]
                print(f"| {n // 1024}k | {bits} | {step} | {base:.2f} | {tree:.2f} | {base / tree:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
