"""DashKVCache: a transformers ``Cache`` that keeps every token and hashes each key once as it is stored.

Layers follow transformers' ``cache_utils`` pattern: ``DashKVCache`` holds one layer object per model layer.
Full-attention layers are :class:`DashKVLayer` (hashed, or dense for the "sandwich" layers); sliding-window
layers are transformers' own ``DynamicSlidingWindowLayer``, exact and bounded as usual.

The attention function is not given the cache, so a sparse layer's ``update`` leaves a hand-off for the
attention call that immediately follows it in the same attention module (:func:`take_pending`). That
thread-local hand-off is the only state outside a cache object; it is matched by tensor identity, so attention
that receives other keys (another cache, no cache) finds nothing and stays exact. What one decode step passes
from layer to layer (temporal calibration, recall measurement) lives on the cache (``DashKVCache.record``).
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from .config import DashKVConfig
from .encoders import HashEncoders, LayerEncoders
from .layout import ModelLayout
from .selectors import DecodeRecord, build_selector, needs_encoders

_pending = threading.local()
_MIN_GROWTH = 64  # tokens
_GROWTH = 64  # buffers grow by 1/64 of the length: ~1.6% spare memory, ~64 rows copied per token on average
_KEY_NORM_TOLERANCE = 1.5  # x; SmolLM2 and Gemma with their own encoders stay below it on text and random tokens
UNREAD_CACHE = (
    "DashKVCache is in use but the model's attention does not read it, so decoding runs full attention and the "
    "key codes are computed for nothing. Load the model with attn_implementation='dashkv' (after `import "
    "hf_dashkv`), or call model.set_attn_implementation('dashkv')."
)


def take_pending(keys: torch.Tensor) -> "DashKVLayer | None":
    """The sparse layer whose ``update`` just returned ``keys``, if any; consumes the hand-off."""
    layer = getattr(_pending, "layer", None)
    if layer is None or layer.keys is not keys:
        return None
    _pending.layer = None
    return layer


class DashKVLayer(CacheLayerMixin):
    """One full-attention layer's cache: K/V ``[B, Hkv, N, D]`` and, if hashed, key codes ``[B, Hkv, N, bits/8]``.

    Storage grows by a bounded share of its length (1/64), so appending a token costs O(1) amortised instead of
    a full copy per step (``DynamicLayer`` concatenates) while the spare room stays small; beam reorders work in
    place. ``keys`` / ``values`` / ``key_codes`` are views of the first ``N`` rows.
    Nothing is ever evicted: selection happens in attention, afresh at every step.

    Args:
        encoders: the layer's hash encoders (its keys are then hashed as they are stored), or ``None``.
        config: the decode policy its selector follows.
        sparse: whether decode steps select rows (``False``: a dense layer, always full attention).
        record: the cache's per-step record, shared by its layers (a fresh one by default).
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(
        self, encoders: LayerEncoders | None, config: DashKVConfig, sparse: bool = True,
        record: DecodeRecord | None = None,
    ):
        super().__init__()
        self.encoders = encoders
        self.config = config
        self.sparse = sparse
        self.selector = build_selector(config, encoders) if sparse else None
        self.record = record if record is not None else DecodeRecord()
        self.length = 0
        self.key_codes: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def hashed(self) -> bool:
        return self.encoders is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        self._buffers = {
            "keys": key_states.new_empty(batch, heads, 0, head_dim),
            "values": value_states.new_empty(batch, heads, 0, value_states.shape[-1]),
        }
        if self.hashed:
            # one model split over devices: each layer's encoders live with that layer's K/V
            self.encoders.to(self.device)
            self._buffers["key_codes"] = torch.empty(
                batch, heads, 0, self.config.code_bytes, dtype=torch.uint8, device=self.device
            )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new K/V ``[B, Hkv, T, D]`` (hashing the keys) and return all K/V so far, ``[B, Hkv, N, D]``;
        a sparse layer leaves itself for the attention call that follows (:func:`take_pending`)."""
        self.store(key_states, value_states)
        if self.sparse:
            waiting = getattr(_pending, "layer", None)
            if waiting is not None and waiting.record is self.record:
                # a sparse layer of this cache stored keys and no "dashkv" attention call took them
                self.record.warn_once(UNREAD_CACHE)
            _pending.layer = self
        return self.keys, self.values

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append K/V ``[B, Hkv, T, D]`` (hashing the keys) outside a forward pass: no attention call follows."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            if self.hashed:
                self._check_key_norms(key_states)
        new = {"keys": key_states, "values": value_states}
        if self.hashed:
            new["key_codes"] = self.encoders.encode_keys(key_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._reserve(end)
        for name, tensor in new.items():
            self._buffers[name][:, :, start:end] = tensor
        self.length = end
        self._refresh_views()

    def _check_key_norms(self, keys: torch.Tensor) -> None:
        """Warn if these keys are not the kind the encoders were trained on: their mean norm per head, recorded
        in ``input_scale`` at training, identifies the model far better than its shape does."""
        trained = self.encoders.key.input_scale
        if bool((trained == 1).all()):  # neutral: random encoders, or trained before the scale was recorded
            return
        seen = keys.float().norm(dim=-1).mean(dim=(0, 2)).to(trained.device)
        off = (seen / trained).log().abs().mean().exp()
        if off > _KEY_NORM_TOLERANCE:
            self.record.warn_once(
                f"The keys of this model's hashed layers are not those the encoders were trained on (mean key norm "
                f"per head {seen.tolist()} here, {trained.tolist()} in training; off by x{float(off):.1f}): the "
                "encoders are probably for another model and will select poorly. Use encoders trained for this "
                "model (lightning fit --config recipes/...), or HashEncoders.random(model.config, config)."
            )

    def _reserve(self, needed: int) -> None:
        capacity = self._buffers["keys"].shape[2]
        if needed <= capacity:
            return
        capacity = needed + max(_MIN_GROWTH, needed // _GROWTH)
        for name, old in self._buffers.items():
            grown = old.new_empty(*old.shape[:2], capacity, old.shape[3])
            grown[:, :, : self.length] = old[:, :, : self.length]
            self._buffers[name] = grown

    def _refresh_views(self) -> None:
        views = {name: buf[:, :, : self.length] for name, buf in self._buffers.items()}
        self.keys, self.values = views["keys"], views["values"]
        self.key_codes = views.get("key_codes")

    def _apply(self, fn) -> None:
        """Apply ``fn`` to every whole buffer (batch or device changes): capacity is kept, so the next step does
        not reallocate."""
        if self.is_initialized:
            self._buffers = {name: fn(buf) for name, buf in self._buffers.items()}
            self._refresh_views()

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._buffers = {}
        self.keys = self.values = self.key_codes = None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (assisted decoding rolls back rejected drafts)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as transformers does."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``b`` takes row ``beam_idx[b]``'s tokens, in place (no new buffer at each step)."""
        if self.is_initialized:
            for buf in self._buffers.values():
                filled = buf[:, :, : self.length]
                filled.copy_(filled.index_select(0, beam_idx.to(buf.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._apply(lambda t: t.to(self.device, non_blocking=True))


class DashKVCache(Cache):
    """A transformers ``Cache`` whose full-attention layers decode with DASH-KV hash selection.

    Use it with a model loaded with ``attn_implementation="dashkv"`` (importing ``hf_dashkv`` registers it)::

        cache = DashKVCache(model.config, encoders=HashEncoders.from_pretrained(path))
        model.generate(**inputs, cache=cache)  # past_key_values=cache before transformers 5.24

    Args:
        model_config: the model's transformers config.
        encoders: hash encoders for this model (``HashEncoders.random`` for the untrained baseline); not needed
            (and unused) when ``config.selector`` is a baseline that does not hash.
        config: budgets and dense layers; defaults to the encoders' own config. Its ``bits`` and
            ``query_hidden`` must match the encoders'; it may make more layers dense than they cover.
    """

    def __init__(self, model_config, encoders: HashEncoders | None = None, config: DashKVConfig | None = None):
        if config is None:
            if encoders is None:
                raise ValueError("DashKVCache needs encoders (HashEncoders.from_pretrained or .random) or a config.")
            config = encoders.config
        layout = ModelLayout.from_model_config(model_config, config)
        hashing = needs_encoders(config)
        if layout.hashed_layers and hashing and encoders is None:
            raise ValueError(
                f"DashKVCache: layers {list(layout.hashed_layers)} are hashed but no encoders were given; pass "
                "encoders=HashEncoders.from_pretrained(...) (trained) or HashEncoders.random(model.config, config)."
            )
        if encoders is not None and hashing:
            encoders.check_compatible(model_config, config)
        self.record = DecodeRecord()
        sliding_kwargs = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))[1]
        layers: list = []
        for idx, layer_type in enumerate(layout.layer_types):
            if layer_type == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(**sliding_kwargs[idx]))
            else:
                sparse = idx in layout.hashed_layers
                layer_encoders = encoders[idx] if sparse and hashing else None
                layers.append(DashKVLayer(layer_encoders, config, sparse=sparse, record=self.record))
        super().__init__(layers=layers)
        self.model_config = model_config
        self.config = config
        self.layout = layout
        self.encoders = encoders if hashing else None

    def fork(self, encoders: HashEncoders | None = None, config: DashKVConfig | None = None) -> "DashKVCache":
        """A new cache holding this cache's tokens under other encoders and/or config; its keys are hashed anew.

        Prefill is exact whatever the method, so several methods can decode from one prefill (``dashkv eval``).
        Arguments as for :class:`DashKVCache`; this cache is left as it is.
        """
        fork = DashKVCache(self.model_config, encoders, config)
        for index, (mine, theirs) in enumerate(zip(self.layers, fork.layers)):
            if not isinstance(theirs, DashKVLayer):
                fork.layers[index] = copy.deepcopy(mine)
            elif mine.is_initialized:
                theirs.store(mine.keys, mine.values)
        return fork

    @contextmanager
    def observing(self, observer):
        """Within the block, ``observer(step, selection)`` sees every selection this cache's layers make
        (``selectors.DecodeStep``, ``selection.Selection``): how recall is measured, and how tests look inside."""
        self.record.observers.append(observer)
        try:
            yield observer
        finally:
            self.record.observers.remove(observer)

    def added_bytes_per_token(self) -> int:
        """Bytes DASH-KV stores per cached token beyond plain K/V: the packed key codes of every hashed layer."""
        if self.encoders is None:
            return 0
        return len(self.layout.hashed_layers) * self.layout.num_kv_heads * self.config.code_bytes
