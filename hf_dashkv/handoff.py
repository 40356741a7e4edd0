"""The one hand-off of the decode path: ``cache.update`` -> the attention call that follows it in the same module.

transformers >= 5.25 passes the attention module's ``kwargs`` dict to ``cache.update(..., kwargs=kwargs)`` and then
to the attention function as ``**kwargs``: the layer travels in that dict. Older 5.x call ``update`` without it, so
the layer waits in a thread-local, matched by tensor identity (attention that receives other keys — another
cache, no cache — finds nothing and stays exact). These two functions are the only place that knows which.
"""

from __future__ import annotations

import threading

import torch

KEYWORD = "dashkv_layer"
_waiting = threading.local()


def leave(layer, update_kwargs: dict) -> None:
    """Leave ``layer`` for the attention call that follows (``update_kwargs``: the keywords ``update`` received)."""
    carried = update_kwargs.get("kwargs")
    if isinstance(carried, dict):
        carried[KEYWORD] = layer
    else:
        _waiting.layer = layer


def take(keys: torch.Tensor, attention_kwargs: dict):
    """The layer whose ``update`` just returned ``keys``, if any, taken out of ``attention_kwargs`` (so that it
    reaches no other attention function) or the thread-local; consumes the hand-off."""
    layer = attention_kwargs.pop(KEYWORD, None)
    if layer is None:
        layer = getattr(_waiting, "layer", None)
        _waiting.layer = None if layer is not None and layer.keys is keys else layer
    if layer is None or layer.keys is not keys:
        return None
    layer.record.pending = None
    return layer
