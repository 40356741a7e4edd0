"""The attention inputs of a real forward pass, for training and measuring encoders: the "dashkv-train" attention.

It is plain SDPA, told per forward call (keyword arguments of the model's forward, which transformers hands to
the attention function; no module state) to

- record the post-RoPE queries, keys and values of layers ``0..until`` (``dashkv_capture=Capture(until)``) and end
  the pass after the last one needed, or
- attend as a DASH-KV decode step would in the hashed layers of ``dashkv_sparse=(HashEncoders, DecodePolicy)``
  (each position attends exactly to what a decode step with the context up to it selects: :func:`selection_mask`),
  so that a joint LoRA can learn under sparse attention.

Registered, with its mask, on ``import hf_dashkv``.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .encoders import HashEncoders, LayerEncoders
from .policy import DecodePolicy
from .selection import select
from .selectors.hash import HashSelector, position_distances

TRAIN_IMPLEMENTATION = "dashkv-train"
# float32 elements of one query-key agreement block: bounds selection memory to ~64 MB at any sequence length
_SELECTION_ELEMENTS = 1 << 24


class Capture:
    """Records ``{layer: (query [B, Hq, T, D], key, value [B, Hkv, T, D], scaling)}``, post-RoPE, for layers
    ``0..until`` of one forward pass, then ends the pass (later layers and the LM head are not needed)."""

    class Done(Exception):
        """Raised after layer ``until``; :func:`capture_attention` catches it."""

    def __init__(self, until: int):
        self.until = until
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}

    def __call__(self, module, query, key, value, scaling: float) -> None:
        self.layers[module.layer_idx] = (query.detach(), key.detach(), value.detach(), scaling)
        if module.layer_idx == self.until:
            raise Capture.Done


@torch.no_grad()
def capture_attention(model, input_ids: torch.Tensor, last_layer: int) -> dict[int, tuple]:
    """``{layer: (query [B, Hq, T, D], key, value [B, Hkv, T, D], scaling)}``, post-RoPE, for layers up to
    ``last_layer``, from one pass of ``model``; the rest of the pass and the LM head are skipped. The model's
    attention implementation is "dashkv-train" for the call and restored after it."""
    capture = Capture(last_layer)
    previous = model.config._attn_implementation
    if previous != TRAIN_IMPLEMENTATION:
        model.set_attn_implementation(TRAIN_IMPLEMENTATION)
    try:
        model(input_ids=input_ids, use_cache=False, dashkv_capture=capture)
    except Capture.Done:
        pass
    finally:
        if previous != TRAIN_IMPLEMENTATION:
            model.set_attn_implementation(previous)
    return capture.layers


@torch.no_grad()
def selection_mask(encoders: LayerEncoders, policy: DecodePolicy, query: torch.Tensor, key: torch.Tensor,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """The keys each query position attends to under DASH-KV: what a decode step with the context up to it selects
    (``selection.select`` over the hash selector's distances). Sequences are taken as unpadded.

    Args:
        encoders: the layer's hash encoders; policy: the decode policy.
        query: post-RoPE ``[B, Hq, T, D]``, at ``positions`` (``[T]``; default: the last ``T`` of ``key``'s ``N``).
        key: post-RoPE ``[B, Hkv, N, D]``.

    Returns:
        bool ``[B, Hkv, T, N]``, causal.
    """
    batch, kv_heads, n, _ = key.shape
    length, group = query.shape[2], query.shape[1] // kv_heads
    key_codes = encoders.encode_keys(key)
    if positions is None:
        positions = torch.arange(n - length, n, device=key.device)
    ends = positions + 1
    keep = torch.zeros(batch, kv_heads, length, n, dtype=torch.bool, device=key.device)
    rows = max(1, _SELECTION_ELEMENTS // (batch * kv_heads * group * n))
    for start in range(0, length, rows):
        scores = position_distances(encoders, query[:, :, start:start + rows], key_codes, policy.group_reduce)
        keep[:, :, start:start + rows] = select(scores, policy, ends[start:start + rows]).mask(n)
    return keep


def train_attention_forward(module, query, key, value, attention_mask, dashkv_capture: Capture | None = None,
                            dashkv_sparse: tuple[HashEncoders, DecodePolicy] | None = None, **kwargs):
    """The "dashkv-train" attention (see the module docstring); otherwise as transformers' SDPA attention."""
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5  # the model's own (e.g. Gemma's query scalar)
    if dashkv_capture is not None:
        dashkv_capture(module, query, key, value, scaling)
    encoders, policy = dashkv_sparse if dashkv_sparse is not None else (None, None)
    if encoders is not None and module.layer_idx in encoders.layout.hashed_layers and not (
        HashSelector(encoders[module.layer_idx]).covers(policy, key.shape[2])  # a covering budget is exact
    ):
        keep = selection_mask(encoders[module.layer_idx], policy, query, key)
        keep = keep.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # query head h reads KV head h // G
        attention_mask = keep if attention_mask is None else keep & attention_mask  # padding (sdpa_mask: bool)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
