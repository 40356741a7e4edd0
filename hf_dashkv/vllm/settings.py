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
from dataclasses import dataclass
from pathlib import Path

import torch

from ..encoders import HashEncoders, LayerEncoders
from ..layout import ModelLayout
from ..policy import DecodePolicy

ENCODERS_FIELD = "dashkv_encoders"
POLICY_FIELD = "dashkv_policy"
# the Hugging Face architecture -> the DASH-KV subclass registered with vLLM (hf_dashkv.vllm.model)
ARCHITECTURES = {"LlamaForCausalLM": "DashKVLlamaForCausalLM"}


def supported_architecture(architectures: list[str] | None) -> str:
    """The DASH-KV architecture for a model's ``architectures``, or ``ValueError`` naming those supported."""
    for name in architectures or ():
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
        if name in ARCHITECTURES.values():
            return name
    raise ValueError(
        f"DASH-KV in vLLM supports the architectures {sorted(ARCHITECTURES)} for now; this model is "
        f"{architectures}. Serve it with plain vLLM, or decode with hf_dashkv's DashKVCache in transformers."
    )


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
    encoders.check_compatible(hf_config)
    layout = ModelLayout.from_model_config(hf_config, policy.dense_layers).hashing_only(encoders.layout.hashed_layers)
    encoders.check_fitted(policy, layout.hashed_layers)
    return encoders, policy, layout


@dataclass(frozen=True)
class LayerState:
    """What a hashed attention layer carries in the engine (``attn.dashkv``): its encoders, the policy, its model
    layer index and the module whose paged cache holds its key codes (``codes.kv_cache``, ``[num_blocks, Hkv,
    block_size, nbytes]`` uint8, bound by vLLM after the model is built)."""

    encoders: LayerEncoders
    policy: DecodePolicy
    layer_idx: int
    codes: torch.nn.Module
