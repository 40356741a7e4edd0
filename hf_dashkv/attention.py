"""The "dashkv" attention function: take the layer ``cache.update`` handed on, let it attend to what it selects.

Registered with transformers on ``import hf_dashkv`` (with the sdpa mask, so padding is honoured), so that
``from_pretrained(..., attn_implementation="dashkv")`` uses it. One decode step reads in one direction:
``cache.update`` has stored and hashed the new key and handed the layer on (``hf_dashkv.handoff``) -> the layer's
selector makes a plan (``hf_dashkv.selectors``, ``hf_dashkv.plans``) -> the layer's backend runs it: codes,
selection, exact attention over the chosen rows (``hf_dashkv.backends``). Everything else (prefill, dense layers,
sliding layers, another cache or none, a budget that covers the context) is plain SDPA, so it is exact by
construction.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import handoff
from .layout import SUPPORTED_LAYOUTS


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
    layer = handoff.take(key, kwargs)
    if layer is None or query.shape[2] != 1 or layer.covers(key.shape[2]):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, key_validity(attention_mask, key), scale, module.layer_idx), None


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
