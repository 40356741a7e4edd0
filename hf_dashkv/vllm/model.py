"""The DASH-KV model subclasses for vLLM: each hashed layer gets a paged side cache of key codes and its encoders.

Per hashed attention layer (``settings.load``: the encoders' layers minus the policy's dense ones), the model adds
a storage-only :class:`DashKVCodes` layer at ``{attention layer name}.codes`` whose KV-cache spec is a uint8
``FullAttentionSpec`` with ``head_size = bits / 8`` per KV head and no values. vLLM puts it in the attention's
KV-cache group (one block table, same block ids: ``docs/vllm-plan.md``), binds it a ``[num_blocks, Hkv,
block_size, nbytes]`` tensor, and the attention impl (``hf_dashkv.vllm.backend``) writes each key's code at the
token's slot and reads the codes back through the block table. The attention layer carries a
:class:`~hf_dashkv.vllm.settings.LayerState` as ``attn.dashkv``; dense layers carry nothing and run stock.

Encoders load from their own folder, never from the model's checkpoint: they are not submodules of the model, so
vLLM's weight loading neither expects nor sees them.

Chosen with ``hf_overrides={"architectures": ["DashKVLlamaForCausalLM"], ...}`` (``hf_dashkv.vllm.LLM`` sets it; the
families and their names: ``settings.ARCHITECTURES``).
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.v1.attention.backend import AttentionBackend, AttentionMetadataBuilder, MultipleOf
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout

from . import settings
from .backend import choose_store


class CodesMetadataBuilder(AttentionMetadataBuilder):
    """No metadata of its own: the attention layer's metadata has the block table and slot mapping."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return None


class CodesBackend(AttentionBackend):
    """Storage only: the codes layer is never called; its cache is written and read by the attention impl."""

    @staticmethod
    def get_name():
        return "CUSTOM"

    @staticmethod
    def get_builder_cls():
        return CodesMetadataBuilder

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("DASH-KV's codes layer stores key codes; the attention impl reads them.")

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(32)]

    @classmethod
    def get_supported_head_sizes(cls):
        return []

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)


class DashKVCodes(torch.nn.Module, AttentionLayerBase):
    """One hashed layer's key codes, paged with its K/V: ``kv_cache`` ``[num_blocks, Hkv, block_size, nbytes]``
    uint8 once vLLM binds it (DeepSeek-V3.2's indexer cache is the pattern)."""

    def __init__(self, prefix: str, num_kv_heads: int, code_bytes: int):
        super().__init__()
        self.kv_cache = torch.tensor([])
        self.prefix, self.num_kv_heads, self.code_bytes = prefix, num_kv_heads, code_bytes
        config = get_current_vllm_config()
        context = config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self

    def get_kv_cache_spec(self, vllm_config):
        return FullAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=self.num_kv_heads,
                                 head_size=self.code_bytes, head_size_v=0, dtype=torch.uint8)

    def get_attn_backend(self):
        return CodesBackend

    def forward(self):  # never called
        raise NotImplementedError


def attach(model: torch.nn.Module, vllm_config) -> None:
    """Give each hashed layer of a decoder ``model`` (``model.layers[i].self_attn.attn``) its codes layer and state.

    Under tensor parallelism each rank's attention holds ``Hkv / tp`` consecutive KV heads (and their query heads),
    so it gets those heads' encoders (``LayerEncoders.shard``) and a codes cache of those heads: each rank selects
    for its own heads, as the whole model would. Under pipeline parallelism a rank's missing layers
    (``PPMissingLayer``, outside ``[model.start_layer, model.end_layer)``) get nothing.
    """
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        raise ValueError(f"DASH-KV in vLLM needs an unquantized KV cache, not kv_cache_dtype="
                         f"{vllm_config.cache_config.cache_dtype!r}.")
    encoders, policy, layout = settings.load(vllm_config.model_config.hf_config)
    store = choose_store(vllm_config.model_config.dtype)
    heads = settings.rank_kv_heads(layout.num_kv_heads, get_tensor_model_parallel_world_size(),
                                   get_tensor_model_parallel_rank())
    held = range(getattr(model, "start_layer", 0), getattr(model, "end_layer", len(model.layers)))
    for idx in layout.hashed_layers:
        if idx not in held:
            continue
        owner = model.layers[idx].self_attn
        attn = owner.attn
        if attn.num_kv_heads != len(heads):
            raise ValueError(f"Layer {idx} holds {attn.num_kv_heads} KV heads on this rank; DASH-KV expected "
                             f"{len(heads)} (heads {heads.start}-{heads.stop - 1} of {layout.num_kv_heads}).")
        codes = DashKVCodes(f"{attn.layer_name}.codes", attn.num_kv_heads, encoders.config.code_bytes)
        owner.dashkv_codes = codes  # a submodule without parameters: weight loading is unchanged
        layer_encoders = encoders[idx] if len(heads) == layout.num_kv_heads else encoders[idx].shard(heads)
        attn.dashkv = settings.LayerState(layer_encoders, policy, idx, codes, store)


class DashKVModel:
    """Mixed in before a vLLM ``*ForCausalLM`` whose decoder is ``self.model`` with ``self.model.layers[i].self_attn
    .attn``: builds the stock model, then attaches DASH-KV (:func:`attach`). A family is one line below."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        attach(self.model, vllm_config)


class DashKVLlamaForCausalLM(DashKVModel, LlamaForCausalLM):
    """vLLM's Llama with DASH-KV decode on its hashed layers (SmolLM2, Llama 2 and 3.x)."""


class DashKVMistralForCausalLM(DashKVModel, MistralForCausalLM):
    """vLLM's Mistral (a Llama with Mistral's checkpoint names) with DASH-KV decode; configs with a sliding window
    are refused (``settings.check_attention``)."""


class DashKVQwen2ForCausalLM(DashKVModel, Qwen2ForCausalLM):
    """vLLM's Qwen2 (Qwen2 and Qwen2.5) with DASH-KV decode on its hashed layers."""


class DashKVQwen3ForCausalLM(DashKVModel, Qwen3ForCausalLM):
    """vLLM's Qwen3 with DASH-KV decode; its keys are hashed after q/k norm and RoPE, as transformers caches them."""
