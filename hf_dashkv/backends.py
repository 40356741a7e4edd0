"""Backends: how a layer runs its plans (``hf_dashkv.plans``). Chosen once per layer, at its first store, from the
device and dtype of its tensors and the type of plan its selector makes (:func:`choose_backend`); nothing is
dispatched per step.

A backend is a small class with a name, :meth:`Backend.refusal` (why it cannot run a layer, or ``None``) and
:meth:`Backend.run` (one step's output and selection). :class:`TorchBackend` runs every plan by its PyTorch
definition (``Plan.attend``), on any device; :class:`NumbaBackend` (fused CPU kernel, ``kernels.py``) and
:class:`TritonBackend` (CUDA, ``triton_kernels.py``) run the plans they name and are tested equal to it. A paged
backend over a serving engine's block tables is to implement the same two methods (docs/vllm-plan.md).
"""

from __future__ import annotations

import torch

from . import triton_kernels
from .plans import CodePlan, Plan, RerankPlan
from .selection import Selection
from .step import DecodeStep

PADDING_FIX = (
    "pad on the left (tokenizer.padding_side = 'left', what batched generate expects), or build the cache with "
    "backend='torch'"
)


class Backend:
    """How a layer runs its plans; one instance per layer. ``left_padding_only``: the layer must check, once per
    prompt, that padding is left padding (``DecodeStep.left_padded``)."""

    name = ""
    left_padding_only = False

    def refusal(self, plan_type: type[Plan], device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run ``plan_type`` plans on ``device`` / ``dtype`` tensors, or ``None``."""
        raise NotImplementedError

    def run(self, plan: Plan, step: DecodeStep) -> tuple[torch.Tensor, Selection]:
        """The step's attention output ``[B, 1, Hq, D]`` and the selection it attended to."""
        raise NotImplementedError


class TorchBackend(Backend):
    """The PyTorch definition of every plan, on any device."""

    name = "torch"

    def refusal(self, plan_type, device, dtype):
        return None

    def run(self, plan, step):
        return plan.attend(step)


class NumbaBackend(Backend):
    """The fused CPU kernel (``kernels.decode_attention``): codes, selection, re-ranking and attention in one call.

    It takes left padding only (the padding batched ``generate`` makes), which the layer checks once per prompt.
    """

    name = "numba"
    left_padding_only = True

    def refusal(self, plan_type, device, dtype):
        # imported at first use, not with hf_dashkv: vLLM 0.32's CPU worker start fails once numba (llvmlite.binding)
        # is in sys.modules, and hf_dashkv's vLLM plugin imports the library there
        from . import kernels

        if kernels.numba is None:
            return "numba is not installed (pip install numba)"
        if device.type != "cpu":
            return f"it runs on the CPU, and this layer's tensors are on {device}"
        if dtype not in kernels.FLOAT_DTYPES:
            return f"it takes fp32 or bf16 keys and values, not {dtype}"
        if not issubclass(plan_type, CodePlan):
            return f"it runs hash-code plans only, not {plan_type.__name__} (the optional learned terms, baselines)"
        return None

    def run(self, plan: CodePlan, step):
        if step.left_padded is False:
            raise ValueError(f"The numba backend takes left padding only, and this batch is padded elsewhere: "
                             f"{PADDING_FIX}.")
        from . import kernels

        shortlist = plan.shortlist if isinstance(plan, RerankPlan) else None
        out, rows, valid = kernels.decode_attention(
            step.query, plan.query_codes, step.key, step.value, step.key_codes, step.first, plan.sinks, plan.recent,
            plan.budget, plan.group_reduce, step.scale, shortlist=shortlist,
        )
        return out, Selection(rows, valid)


class TritonBackend(Backend):
    """Three Triton kernels on CUDA (``triton_kernels.decode_attention``); any padding; nothing read back."""

    name = "triton"

    def refusal(self, plan_type, device, dtype):
        if triton_kernels.triton is None:
            return "triton is not installed (pip install 'hf_dashkv[gpu]')"
        if device.type != "cuda" and not (triton_kernels.interpreting() and device.type == "cpu"):
            return f"it runs on CUDA, and this layer's tensors are on {device}"
        if dtype not in triton_kernels.FLOAT_DTYPES:
            return f"it takes fp16, bf16 or fp32 keys and values, not {dtype}"
        if plan_type is not CodePlan:
            return (f"it runs plain hash-code plans only, not {plan_type.__name__} (re-ranking and the optional "
                    "learned terms have no Triton kernel yet)")
        return None

    def run(self, plan: CodePlan, step):
        out, rows, valid = triton_kernels.decode_attention(
            step.query, plan.query_codes, step.key, step.value, step.key_codes, step.first, plan.sinks, plan.recent,
            plan.budget, plan.group_reduce, step.scale, seen=step.valid,
        )
        return out, Selection(rows, valid)


BACKENDS = {backend.name: backend for backend in (NumbaBackend, TritonBackend, TorchBackend)}


def choose_backend(requested: str, plan_type: type[Plan], device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend a layer runs with: ``requested`` by name, or with ``"auto"`` the first of numba, triton, torch
    that can run it (the PyTorch definition runs everything, so the choice always succeeds).

    Raises ``ValueError`` for an unknown name, or a named backend that cannot run this layer (with the reason).
    """
    if requested == "auto":
        return next(cls() for cls in BACKENDS.values() if cls().refusal(plan_type, device, dtype) is None)
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r}: choose 'auto' or one of {sorted(BACKENDS)}.")
    backend = BACKENDS[requested]()
    reason = backend.refusal(plan_type, device, dtype)
    if reason is not None:
        raise ValueError(f"backend={requested!r} cannot run this layer: {reason}. Use backend='auto' (or 'torch').")
    return backend
