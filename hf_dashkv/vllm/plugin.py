"""vLLM's ``vllm.general_plugins`` entry point (``setup.cfg``): registers the DASH-KV model subclasses and, on CPU,
DASH-KV's ``CPU_ATTN`` backend.

vLLM runs it once per process (engine core, workers, argument parsing), before models are built; it may run several
times, so it only writes registry entries. The backend override reaches every model in the process, which is why
:class:`~hf_dashkv.vllm.backend.DashKVCPUBackend` behaves as the stock backend on layers without DASH-KV state.
Models are registered as ``"module:Class"`` strings: nothing heavy is imported here.
"""

from __future__ import annotations

from .settings import ARCHITECTURES

BACKEND = "hf_dashkv.vllm.backend.DashKVCPUBackend"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for architecture in ARCHITECTURES.values():
        ModelRegistry.register_model(architecture, f"hf_dashkv.vllm.model:{architecture}")
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
