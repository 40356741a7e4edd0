"""End-to-end checks of the vLLM plugin, run in a vLLM environment (``tests/hf_dashkv/vllm/test_vllm_e2e.py`` runs
them through ``.venv-vllm/bin/python``, which ``scripts/install.sh`` makes)::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 python -m hf_dashkv.vllm.selftest spec.json

``spec.json``::

    {"out": "result.json",
     "tiny": "folder",                  # optional: save a tiny random model (fp32) there first
     "family": "llama" | "qwen2" | "qwen3",   # its family (default llama)
     "random_encoders": {"folder": "...", "model": "...", "bits": 32, "seed": 0},   # optional: SimHash encoders
     "runs": [{"model": "...", "prompts": [[token ids], ...], "max_tokens": 8,
               "dashkv": null | {"encoders": "...", "policy": {...} | null},
               "check": false,            # check every DASH-KV decode step against the library (below)
               "then": [[[token ids], ...], ...],   # optional: later batches on the same engine
               "llm": {...}}]}            # extra vllm.LLM arguments

Each run builds an engine (single-process, eager, fp32, block size 32 unless ``llm`` says otherwise), generates
greedily from token ids and records the tokens, the attention impls in use, which layers carry DASH-KV state and,
with ``check``, what every DASH-KV decode step was checked against. ``result.json``: ``{"runs": [...]}``.

The per-step check, on each decode request of each DASH-KV layer, after the impl ran:

- the key codes read back through the block table equal the codes of the keys read back (``encode_keys``): codes
  are written at the right slots;
- covered by the budget: the output (the stock kernel's) equals dense attention over the gathered context;
- not covered: the output equals ``HashSelector.plan(step, policy).attend(step)`` on the request's contiguous K/V,
  what ``generate`` runs, and the selection attends to fewer rows than the context.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")


# the tiny models' families: transformers' config and model class names
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def save_tiny(folder: str, family: str = "llama", seed: int = 0) -> None:
    """A tiny random model of ``family`` (``FAMILIES``: 2 layers, 4 query heads, 2 KV heads, head_dim 32), fp32, saved
    with transformers. Qwen2 gets its q/k/v biases, Qwen3 its q/k norms, as their configs build them."""
    import torch
    import transformers

    config_name, model_name = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, torch_dtype="float32")
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # norms start at 1 and biases at 0: random ones make the norms and biases matter
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight", "_proj.bias")):
                parameter.copy_(torch.rand_like(parameter) + 0.5 if "norm" in name else torch.randn_like(parameter))
    model.save_pretrained(folder)


def save_random_encoders(folder: str, model: str, bits: int = 32, seed: int = 0) -> None:
    from transformers import AutoConfig

    from hf_dashkv import EncoderConfig, HashEncoders

    HashEncoders.random(AutoConfig.from_pretrained(model), EncoderConfig(bits=bits, query_hidden=0),
                        seed=seed).save_pretrained(folder)


class StepChecker:
    """Wraps ``DashKVCPUImpl.forward`` to check each DASH-KV decode step against the library (module docstring)."""

    def __init__(self):
        self.counts = {"tokens hashed": 0, "decode steps checked": 0, "covered": 0, "selected": 0, "dropped rows": 0,
                       "mixed batches": 0, "code bytes": 0, "code bytes differing": 0,
                       "max covered error": 0.0, "max selected error": 0.0, "max selected vs dense": 0.0,
                       "max rows attended": 0, "min context when selected": None}

    def install(self):
        from . import backend

        original = self.original = backend.DashKVCPUImpl.forward
        original_update = self.original_update = backend.DashKVCPUImpl.do_kv_cache_update
        checker = self

        def counting(impl, layer, key, value, kv_cache, slot_mapping):
            original_update(impl, layer, key, value, kv_cache, slot_mapping)
            state = getattr(layer, "dashkv", None)
            if state is not None and state.layer_idx == 0:  # tokens whose codes layer 0 wrote
                checker.counts["tokens hashed"] += int((slot_mapping[: key.shape[0]] >= 0).sum())

        def checking(impl, layer, query, key, value, kv_cache, md, output, *args, **kwargs):
            output = original(impl, layer, query, key, value, kv_cache, md, output, *args, **kwargs)
            if md is not None and getattr(layer, "dashkv", None) is not None:
                checker.check(impl, layer.dashkv, query, kv_cache, md, output)
            return output

        backend.DashKVCPUImpl.forward = checking
        backend.DashKVCPUImpl.do_kv_cache_update = counting

    def uninstall(self):
        from . import backend

        backend.DashKVCPUImpl.forward = self.original
        backend.DashKVCPUImpl.do_kv_cache_update = self.original_update

    def check(self, impl, state, query, kv_cache, md, output) -> None:
        import torch

        from ..exact import attend_rows
        from ..selection import Selection
        from ..selectors.base import Selector
        from ..selectors.hash import HashSelector
        from ..step import DecodeStep
        from .paged import cpu_kv_views, gather_blocks

        c = self.counts
        starts, seq_lens = md.query_start_loc.tolist(), md.seq_lens.tolist()
        lengths = [b - a for a, b in itertools.pairwise(starts)]
        c["mixed batches"] += int(1 in lengths and any(n > 1 for n in lengths))
        key_view, value_view = cpu_kv_views(kv_cache)
        codes = state.codes.kv_cache
        block_size = codes.shape[2]
        for r, (length, n) in enumerate(zip(lengths, seq_lens)):
            if length != 1:
                continue
            c["decode steps checked"] += 1
            blocks = md.block_table[r, : -(-n // block_size)].long()
            keys, values, stored = (gather_blocks(t, blocks, n) for t in (key_view, value_view, codes))
            recomputed = state.encoders.encode_keys(keys)
            c["code bytes"] += stored.numel()
            c["code bytes differing"] += int((recomputed != stored).sum())
            out = output[starts[r]]
            query_r = query[starts[r]][None, :, None]  # [1, Hq, 1, D]
            heads = keys.shape[1]
            everything = Selection(torch.arange(n).expand(1, heads, n), torch.ones(1, heads, n, dtype=torch.bool))
            dense = attend_rows(query_r, keys, values, everything, impl.scale)[0, 0]
            if Selector().covers(state.policy, n):
                c["covered"] += 1
                c["max covered error"] = max(c["max covered error"], float((out - dense).abs().max()))
                continue
            step = DecodeStep(query_r, keys, values, recomputed, None, impl.scale, state.layer_idx)
            reference, selection = HashSelector(state.encoders).plan(step, state.policy).attend(step)
            attended = int(selection.mask(n).sum(-1).max())
            c["selected"] += 1
            c["dropped rows"] += int(attended < n)
            c["max rows attended"] = max(c["max rows attended"], attended)
            low = c["min context when selected"]
            c["min context when selected"] = n if low is None else min(low, n)
            c["max selected error"] = max(c["max selected error"], float((out - reference[0, 0]).abs().max()))
            c["max selected vs dense"] = max(c["max selected vs dense"], float((out - dense).abs().max()))


def run_one(run: dict) -> dict:
    from vllm import LLM as VllmLLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    checker = None
    if run.get("check"):
        checker = StepChecker()
        checker.install()
    kwargs = {"skip_tokenizer_init": True, "dtype": "float32", "block_size": 32, "max_model_len": 1024,
              "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
    kwargs.update(run.get("llm", {}))
    start = time.perf_counter()
    if run.get("dashkv") is not None:
        from . import LLM

        llm = LLM(run["model"], encoders=run["dashkv"].get("encoders"), policy=run["dashkv"].get("policy"), **kwargs)
    else:
        llm = VllmLLM(model=run["model"], **kwargs)
    built = time.perf_counter()
    context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    impls = sorted({type(layer.impl).__name__ for layer in context.values() if hasattr(layer, "impl")})
    dashkv_layers = sorted(name for name, layer in context.items() if getattr(layer, "dashkv", None) is not None)
    codes = {name: list(layer.kv_cache.shape) for name, layer in context.items() if name.endswith(".codes")}
    sampling = SamplingParams(max_tokens=run.get("max_tokens", 8), temperature=0.0, ignore_eos=True)
    batches = [run["prompts"], *run.get("then", [])]  # later batches on the same engine: prefix-cache hits
    tokens = [[list(o.outputs[0].token_ids) for o in llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in batch], sampling, use_tqdm=False)] for batch in batches]
    done = time.perf_counter()
    result = {"tokens": tokens[0], "then_tokens": tokens[1:], "impls": impls, "dashkv_layers": dashkv_layers,
              "prefix_caching": bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching),
              "codes_shapes": codes, "build_seconds": built - start, "generate_seconds": done - built,
              "checks": checker.counts if checker else None}
    if checker:
        checker.uninstall()
    del llm
    gc.collect()
    return result


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("tiny") and not os.path.isfile(os.path.join(spec["tiny"], "config.json")):
        save_tiny(spec["tiny"], spec.get("family", "llama"))
    if spec.get("random_encoders"):
        save_random_encoders(**spec["random_encoders"])
    results = [run_one(run) for run in spec["runs"]]
    with open(spec["out"], "w") as f:
        json.dump({"runs": results}, f)


if __name__ == "__main__":
    main(sys.argv[1])
