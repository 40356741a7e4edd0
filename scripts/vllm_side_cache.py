"""Check the side-cache plan in vLLM 0.32 on CPU: a uint8 per-token cache beside each attention layer's K/V.

A Llama subclass registered with ``ModelRegistry.register_model`` adds, per decoder layer, a storage-only layer
whose ``get_kv_cache_spec()`` is a uint8 ``FullAttentionSpec`` (``[num_blocks, Hkv, block_size, nbytes]``), the
pattern of DeepSeek-V3.2's indexer cache. The CPU attention impl is wrapped to write each token's "code" (here a
deterministic function of the token's slot, standing in for the key's hash) at ``slot_mapping`` in the side cache,
and, at each decode step, to read the codes back through the attention's own ``block_table`` and check them. It
prints the KV-cache groups, the side cache's shape and whether it shares the attention's blocks.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 python scripts/vllm_side_cache.py [workdir]
"""

import os
import sys
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

NBYTES = 8


def main() -> None:
    import torch
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends import cpu_attn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vllm_inspect import save_tiny_llama

    folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tiny-llama-")
    save_tiny_llama(folder)
    ModelRegistry.register_model("CodesLlamaForCausalLM", _model_module().CodesLlamaForCausalLM)

    checks = {"decode steps": 0, "codes equal": 0, "tokens checked": 0}
    update, forward = cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update, cpu_attn.CPUAttentionBackendImpl.forward

    def code_of(slots):  # a stand-in for the key's hash: any function of what was written
        return ((slots.view(-1, 1) * 7 + torch.arange(NBYTES)) % 251).to(torch.uint8)

    def writing_update(self, layer, key, value, kv_cache, slot_mapping):
        update(self, layer, key, value, kv_cache, slot_mapping)
        codes = layer.codes_layer.kv_cache  # [num_blocks, Hkv, block_size, nbytes]
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        bs = codes.shape[2]
        codes[slots // bs, :, slots % bs] = code_of(slots).unsqueeze(1).expand(-1, codes.shape[1], -1)

    def reading_forward(self, layer, query, key, value, kv_cache, md, output, *args, **kwargs):
        if md is not None and md.max_query_len == 1:
            codes = layer.codes_layer.kv_cache
            bs = codes.shape[2]
            checks["decode steps"] += 1
            ok = True
            for r, n in enumerate(md.seq_lens.tolist()):
                p = torch.arange(n)
                blocks = md.block_table[r, p // bs].long()
                slots = blocks * bs + p % bs
                ok &= torch.equal(codes[blocks, 0, p % bs], code_of(slots))
                checks["tokens checked"] += n
            checks["codes equal"] += int(ok)
        return forward(self, layer, query, key, value, kv_cache, md, output, *args, **kwargs)

    cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update = writing_update
    cpu_attn.CPUAttentionBackendImpl.forward = reading_forward

    llm = LLM(model=folder, skip_tokenizer_init=True, dtype="float32", block_size=32, max_model_len=256,
              enforce_eager=True, kv_cache_memory_bytes=64 << 20,
              hf_overrides={"architectures": ["CodesLlamaForCausalLM"]})
    config = llm.llm_engine.vllm_config
    ctx = config.compilation_config.static_forward_context
    for name, layer in ctx.items():
        if name.endswith(".codes") and name.startswith("model.layers.0."):
            attn = ctx[name[: -len(".codes")]]
            print(f"{name}: kv_cache {tuple(layer.kv_cache.shape)} {layer.kv_cache.dtype}; "
                  f"attention kv_cache {tuple(attn.kv_cache.shape)} {attn.kv_cache.dtype}")
    prompts = [TokensPrompt(prompt_token_ids=list(range(1, 41))), TokensPrompt(prompt_token_ids=list(range(5, 75)))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    print("tokens", [o.outputs[0].token_ids for o in outs])
    print("checks", checks)


def _model_module():
    """The model subclass (registered as a class: a ``"module:Class"`` string is inspected in a subprocess, which
    needs an importable module)."""
    import types

    import torch
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.v1.attention.backend import AttentionBackend, AttentionMetadataBuilder, MultipleOf
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout

    class CodesBuilder(AttentionMetadataBuilder):
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            return None  # the attention layer's own metadata has the block table and slot mapping

    class CodesBackend(AttentionBackend):
        @staticmethod
        def get_name():
            return "CUSTOM"

        @staticmethod
        def get_builder_cls():
            return CodesBuilder

        @staticmethod
        def get_impl_cls():
            raise NotImplementedError("storage only")

        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None):
            return [MultipleOf(32)]

        @classmethod
        def get_supported_head_sizes(cls):
            return []

        @classmethod
        def supported_kv_cache_layouts(cls):
            return (KVCacheLayout.LBHNC,)

    class CodesLayer(torch.nn.Module, AttentionLayerBase):
        def __init__(self, prefix, num_kv_heads):
            super().__init__()
            self.kv_cache = torch.tensor([])
            self.prefix, self.num_kv_heads = prefix, num_kv_heads
            config = get_current_vllm_config()
            self.block_size = config.cache_config.block_size
            config.compilation_config.static_forward_context[prefix] = self

        def get_kv_cache_spec(self, vllm_config):
            return FullAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=self.num_kv_heads,
                                     head_size=NBYTES, head_size_v=0, dtype=torch.uint8)

        def get_attn_backend(self):
            return CodesBackend

        def forward(self):
            ...

    class CodesLlamaForCausalLM(LlamaForCausalLM):
        def __init__(self, *, vllm_config, prefix=""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            for layer in self.model.layers:
                attn = layer.self_attn.attn
                layer.self_attn.codes = CodesLayer(f"{attn.layer_name}.codes", attn.num_kv_heads)
                attn.codes_layer = layer.self_attn.codes

    module = types.ModuleType("vllm_side_cache_model")
    module.CodesLlamaForCausalLM = CodesLlamaForCausalLM
    return module


if __name__ == "__main__":
    main()
