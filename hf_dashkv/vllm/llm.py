"""``hf_dashkv.vllm.LLM``: vLLM's ``LLM`` with DASH-KV decode on.

    from hf_dashkv.vllm import LLM
    llm = LLM("smollm2-135m", dtype="float32")      # the embedded SmolLM2 with its shipped encoders and policy
    llm = LLM("path/or/hub-id", encoders="encoders/folder", policy=DecodePolicy(budget=0.0625))

The encoders and policy are checked here, in the caller's process, exactly as the engine will load them
(``settings.load``), and reach the engine as ``hf_overrides`` fields (``settings``). vLLM itself is imported only when
this is called.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..embedded import DEFAULT_MODEL, model_path, shipped_encoders
from ..policy import DecodePolicy
from . import settings


def LLM(model: str = DEFAULT_MODEL, encoders: str | Path | None = None, policy: DecodePolicy | dict | None = None,
        **vllm_kwargs):
    """vLLM's ``LLM`` for ``model`` with DASH-KV decode on its hashed layers.

    Args:
        model: an embedded model name (``"smollm2-135m"``), a local folder or a Hub id of a supported architecture
            (``settings.ARCHITECTURES``: Llama, Mistral without a sliding window, Qwen2/2.5, Qwen3; others are
            refused, naming those supported).
        encoders: a folder or Hub id of hash encoders for this model; default: the encoders shipped for the
            embedded SmolLM2 (refused, by ``HashEncoders.check_compatible``, for any other model).
        policy: a :class:`DecodePolicy` (or its dict); default: the encoders' recommended one, else
            ``DecodePolicy()``. Tier 2 and calibration are refused (not run by the paged path yet).
        vllm_kwargs: passed to ``vllm.LLM`` (``dtype``, ``max_model_len``, ...); an ``hf_overrides`` dict is kept and
            extended.
    """
    extra = vllm_kwargs.pop("hf_overrides", None) or {}
    path, hf_overrides = prepare(model, encoders, policy, vllm_kwargs.get("trust_remote_code", False), extra,
                                 vllm_kwargs.get("tensor_parallel_size", 1))
    worker = settings.worker_cls(vllm_kwargs.pop("worker_cls", None))
    from vllm import LLM as VllmLLM  # only now: every refusal above runs without vLLM

    from .plugin import register

    register()  # idempotent; worker processes load it through the entry point
    return VllmLLM(model=path, hf_overrides=hf_overrides, worker_cls=worker, **vllm_kwargs)


def prepare(model: str = DEFAULT_MODEL, encoders: str | Path | None = None, policy: DecodePolicy | dict | None = None,
            trust_remote_code: bool = False, extra: dict | None = None,
            tensor_parallel_size: int = 1) -> tuple[str, dict]:
    """The model path and the ``hf_overrides`` that turn DASH-KV on for it (``extra`` kept and extended), after every
    check the engine will run (``settings.load``, and the split of KV heads over ``tensor_parallel_size`` ranks);
    ``ValueError`` for what DASH-KV in vLLM refuses. No vLLM import: ``LLM`` and ``dashkv serve`` both start here."""
    from transformers import AutoConfig

    path = model_path(model)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    architecture = settings.supported_architecture(getattr(hf_config, "architectures", None))
    if encoders is None:
        encoders = shipped_encoders(DEFAULT_MODEL)
    if isinstance(policy, dict):
        policy = DecodePolicy.from_dict(policy)
    if policy is not None and not isinstance(policy, DecodePolicy):
        raise TypeError(f"LLM(policy=...) takes a DecodePolicy or a dict, not {type(policy).__name__}.")
    extra = extra or {}
    if not isinstance(extra, dict):
        raise TypeError("LLM(hf_overrides=...) must be a dict here (DASH-KV adds its fields to it).")
    # the engine's own loading path, run here first so that mistakes surface in the caller's process; on the config
    # the engine will see (the caller's overrides applied, e.g. {"sliding_window": None})
    probe = copy.deepcopy(hf_config)
    probe.update({key: value for key, value in extra.items() if key != "architectures"})
    setattr(probe, settings.ENCODERS_FIELD, str(encoders))
    if policy is not None:
        setattr(probe, settings.POLICY_FIELD, settings.policy_json(policy))
    _, policy, layout = settings.load(probe)
    settings.rank_kv_heads(layout.num_kv_heads, tensor_parallel_size, 0)
    return path, {**extra, **settings.overrides(encoders, policy, architecture)}
