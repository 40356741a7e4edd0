"""The "dashkv" attention function: find the layer's cache, let its selector pick the rows, attend to them.

Registered with transformers on ``import hf_dashkv`` (with the sdpa mask, so padding is honoured), so that
``from_pretrained(..., attn_implementation="dashkv")`` uses it. One decode step reads in one direction:
``cache.update`` has stored and hashed the new key and left the layer for this call (the one hand-off,
``cache.take_pending``) -> the layer's selector (``hf_dashkv.selectors``) scores the cached tokens and
``hf_dashkv.selection.select`` picks the rows -> exact attention over those rows (``hf_dashkv.exact``; on the CPU
the hash selector runs the whole step as one compiled kernel). Everything else (prefill, dense layers, sliding
layers, another cache or none, a budget that covers the context) is plain SDPA, so it is exact by construction.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import take_pending
from .layout import SUPPORTED_LAYOUTS
from .selectors import DecodeStep


def dashkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``query [B, Hq, q, D]``, ``key/value [B, Hkv, N, D]`` -> ``[B, q, Hq, D]``."""
    extra = sorted(name for name in EXTRA_LOGIT_TERMS if kwargs.get(name) is not None)
    if extra:
        raise ValueError(
            f"This model's attention adds terms to the logits ({', '.join(extra)}) that DASH-KV's selection would "
            f"silently drop. Supported: {SUPPORTED_LAYOUTS}. Load the model with another attn_implementation."
        )
    layer = take_pending(key)
    if layer is None or query.shape[2] != 1 or layer.selector.covers(key.shape[2]):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    step = DecodeStep(
        query, key, value, layer.key_codes, key_validity(attention_mask, key),
        scaling if scaling is not None else query.shape[-1] ** -0.5, module.layer_idx, layer.record,
    )
    out, selection = layer.selector.decode(step)
    for observe in layer.record.observers:
        observe(step, selection)
    return out, None


EXTRA_LOGIT_TERMS = ("s_aux", "sinks", "position_bias", "alibi", "softcap")


def key_validity(attention_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """Which keys the (single) query may see, bool ``[B, N]``, from a 4D bool or additive mask; ``None`` for all."""
    batch, n = key.shape[0], key.shape[2]
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, -n:]
    if last.dtype != torch.bool:
        last = last > torch.finfo(last.dtype).min / 2
    return last.expand(batch, n)
