"""DashKVCache: a transformers ``Cache`` that keeps every token and hashes each key once as it is stored.

Layers follow transformers' ``cache_utils`` pattern: ``DashKVCache`` holds one layer object per model layer.
Full-attention layers are :class:`DashKVLayer` (hashed, or dense for the "sandwich" layers); sliding-window
layers are transformers' own ``DynamicSlidingWindowLayer``, exact and bounded as usual.

A decode step reads one way: ``update`` stores (and hashes) the new keys and hands the layer to the attention call
that follows (``hf_dashkv.handoff``); the attention function calls :meth:`DashKVLayer.attend`, where the layer's
selector makes a plan and the layer's backend, chosen once at its first store, runs it. What one decode step
passes from layer to layer (temporal calibration, recall measurement) lives on the cache (``DashKVCache.record``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from . import handoff
from .backends import Backend, choose_backend
from .encoders import HashEncoders, LayerEncoders
from .layout import ModelLayout
from .policy import DecodePolicy
from .selection import first_position, left_padded
from .selectors import DenseSelector, HashSelector, Selector, Tier2Selector, hash_selector
from .selectors.calibrated import remember_selection
from .step import DecodeRecord, DecodeStep

_MIN_GROWTH = 64  # tokens
_GROWTH = 64  # buffers grow by 1/64 of the length: ~1.6% spare memory, ~64 rows copied per token on average
_KEY_NORM_TOLERANCE = 1.5  # x; SmolLM2 and Gemma with their own encoders stay below it on text and random tokens
UNREAD_CACHE = (
    "DashKVCache is in use but the model's attention does not read it, so decoding runs full attention and the "
    "key codes are computed for nothing. Load the model with attn_implementation='dashkv' (after `import "
    "hf_dashkv`), or call model.set_attn_implementation('dashkv')."
)


class DashKVLayer(CacheLayerMixin):
    """One full-attention layer's cache: K/V ``[B, Hkv, N, D]`` and, if hashed, key codes ``[B, Hkv, N, bits/8]``.

    Storage grows by a bounded share of its length (1/64), so appending a token costs O(1) amortised instead of
    a full copy per step (``DynamicLayer`` concatenates) while the spare room stays small; beam reorders work in
    place. ``keys`` / ``values`` / ``key_codes`` are views of the first ``N`` rows.
    Nothing is ever evicted: selection happens in attention, afresh at every step.

    Args:
        encoders: the layer's hash encoders (its keys are then hashed as they are stored), or ``None``.
        policy: the decode policy its selector follows.
        selector: what decode steps select (``None``: a dense layer, always full attention).
        backend: how its plans run: ``"auto"`` or a name of ``backends.BACKENDS``; chosen at the first store.
        record: the cache's per-step record, shared by its layers (a fresh one by default).
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(
        self, encoders: LayerEncoders | None, policy: DecodePolicy, selector: Selector | None = None,
        backend: str = "auto", record: DecodeRecord | None = None,
    ):
        super().__init__()
        self.encoders = encoders
        self.policy = policy
        self.selector = selector
        self.requested_backend = backend
        self.backend: Backend | None = None
        self.record = record if record is not None else DecodeRecord()
        self.length = 0
        self.key_codes: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._left_padded: bool | None = None  # checked once per prompt (_padding)

    @property
    def sparse(self) -> bool:
        """Whether decode steps select rows (``False``: a dense layer)."""
        return self.selector is not None

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
            code_bytes = self.encoders.key.weight.shape[-1] // 8
            self._buffers["key_codes"] = torch.empty(batch, heads, 0, code_bytes, dtype=torch.uint8, device=self.device)
        if self.sparse:  # the one backend choice of this layer
            self.backend = choose_backend(self.requested_backend, self.selector.plan_type(self.policy), self.device,
                                          self.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new K/V ``[B, Hkv, T, D]`` (hashing the keys) and return all K/V so far, ``[B, Hkv, N, D]``;
        a sparse layer hands itself to the attention call that follows (``hf_dashkv.handoff``)."""
        self.store(key_states, value_states)
        if self.sparse:
            if self.record.pending is not None:
                # a sparse layer of this cache stored keys and no "dashkv" attention call took them
                self.record.warn_once(UNREAD_CACHE)
            self.record.pending = self
            handoff.leave(self, kwargs)
        return self.keys, self.values

    def covers(self, n: int) -> bool:
        """Whether a step over ``n`` cached tokens attends to all of them (a dense layer, or a covering budget)."""
        return not self.sparse or self.selector.covers(self.policy, n)

    def attend(self, query: torch.Tensor, valid: torch.Tensor | None, scale: float, layer_idx: int) -> torch.Tensor:
        """One decode step over this layer's cache: the selector's plan, run by the layer's backend.

        Args:
            query: ``[B, Hq, 1, D]``; valid: bool ``[B, N]``, ``False`` at padding, or ``None``; scale: the attention
                scaling; layer_idx: the model layer.

        Returns:
            ``[B, 1, Hq, D]``; every observer on the cache's record sees the step and its selection.
        """
        padding = self._padding(valid) if self.backend.left_padding_only else None  # a read-back: CPU only
        step = DecodeStep(query, self.keys, self.values, self.key_codes, valid, scale, layer_idx, self.record,
                          padding)
        out, selection = self.backend.run(self.selector.plan(step, self.policy), step)
        for observe in self.record.observers:
            observe(step, selection)
        return out

    def _padding(self, valid: torch.Tensor | None) -> bool:
        """Whether the padding is left padding only: read over the whole cache once per prompt, then only whether
        each new key is real (``generate`` appends real tokens; a masked one is padding after the tokens)."""
        if valid is None:
            return True
        if self._left_padded is None or (self._left_padded and not bool(valid[:, -1].all())):
            self._left_padded = left_padded(valid, first_position(valid, valid.shape[0], valid.device))
        return self._left_padded

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append K/V ``[B, Hkv, T, D]`` (hashing the keys) outside a forward pass: no attention call follows."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            if self.hashed:
                self._check_key_norms(key_states)
        if key_states.shape[-2] > 1:
            self._left_padded = None  # a new prompt (or chunk of one): its padding is read at the next step
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
                "model (lightning fit --config recipes/...), or HashEncoders.random(model.config)."
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
        self._left_padded = None
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
        self._left_padded = None

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

        cache = DashKVCache(model.config, HashEncoders.from_pretrained(path))  # the encoders' recommended policy
        model.generate(**inputs, cache=cache)  # past_key_values=cache before transformers 5.24

    Args:
        model_config: the model's transformers config.
        encoders: hash encoders for this model (``HashEncoders.random`` for the untrained baseline); not needed
            (and unused) with a baseline ``selector``.
        policy: the decode policy; default: the encoders' recommended one (``encoders.policy``), else
            ``DecodePolicy()``. Layers the encoders have no weights for run dense whatever the policy says.
        selector: a baseline instead of DASH-KV hashing (``hf_dashkv.selectors``: ``OracleSelector()``,
            ``QuestSelector(page_size=16)``, ``StreamingSelector()``, ``DenseSelector()``); ``None``: hashing.
        backend: how decode steps run: ``"auto"`` (per layer, at its first store: numba on the CPU, Triton on
            CUDA, else the PyTorch definition), or ``"numba"``, ``"triton"``, ``"torch"`` (refused with the reason
            where it cannot run).
    """

    def __init__(self, model_config, encoders: HashEncoders | None = None, policy: DecodePolicy | None = None,
                 selector: Selector | None = None, backend: str = "auto"):
        hashing = selector is None
        if policy is None:
            policy = encoders.policy if encoders is not None and encoders.policy is not None else DecodePolicy()
        if not isinstance(policy, DecodePolicy):
            raise TypeError(f"DashKVCache(policy=...) takes a DecodePolicy, not {type(policy).__name__}.")
        layout = ModelLayout.from_model_config(model_config, policy.dense_layers)
        if hashing:
            if encoders is None:
                raise ValueError(
                    "DashKVCache hashes keys, so it needs encoders: pass HashEncoders.from_pretrained(...) (trained) "
                    "or HashEncoders.random(model.config) (SimHash), or a baseline selector=... (hf_dashkv.selectors)."
                )
            encoders.check_compatible(model_config)
            layout = layout.hashing_only(encoders.layout.hashed_layers)
            encoders.check_fitted(policy, layout.hashed_layers)
        elif isinstance(selector, (HashSelector, Tier2Selector)):
            raise ValueError(
                f"DashKVCache(selector={type(selector).__name__}(...)): hash selectors are made per layer from the "
                "encoders; pass encoders=... and leave selector=None."
            )
        else:
            selector.check(policy)
            if isinstance(selector, DenseSelector):
                layout = layout.hashing_only(())
        self.record = DecodeRecord()
        if hashing and policy.temporal_calibration:
            self.record.observers.append(remember_selection)
        sliding_kwargs = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))[1]
        layers: list = []
        for idx, layer_type in enumerate(layout.layer_types):
            if layer_type == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(**sliding_kwargs[idx]))
            elif idx not in layout.hashed_layers:
                layers.append(DashKVLayer(None, policy, None, backend, self.record))
            elif hashing:
                layers.append(DashKVLayer(encoders[idx], policy, hash_selector(policy, encoders[idx]), backend,
                                          self.record))
            else:
                layers.append(DashKVLayer(None, policy, selector, backend, self.record))
        super().__init__(layers=layers)
        self.model_config = model_config
        self.policy = policy
        self.selector = selector
        self.backend = backend
        self.layout = layout
        self.encoders = encoders if hashing else None

    def fork(self, encoders: HashEncoders | None = None, policy: DecodePolicy | None = None,
             selector: Selector | None = None) -> "DashKVCache":
        """A new cache holding this cache's tokens under other encoders, policy and/or selector; its keys are hashed
        anew.

        Prefill is exact whatever the method, so several methods can decode from one prefill (``dashkv eval``).
        ``encoders`` and ``selector`` as for :class:`DashKVCache` (the method of the fork); ``policy``: default this
        cache's. The backend choice is this cache's; this cache is left as it is.
        """
        fork = DashKVCache(self.model_config, encoders, policy or self.policy, selector, self.backend)
        for index, (mine, theirs) in enumerate(zip(self.layers, fork.layers)):
            if not isinstance(theirs, DashKVLayer):
                fork.layers[index] = copy.deepcopy(mine)
            elif mine.is_initialized:
                theirs.store(mine.keys, mine.values)
        return fork

    @contextmanager
    def observing(self, observer):
        """Within the block, ``observer(step, selection)`` sees every selection this cache's layers make
        (``step.DecodeStep``, ``selection.Selection``): how recall is measured, and how tests look inside."""
        self.record.observers.append(observer)
        try:
            yield observer
        finally:
            self.record.observers.remove(observer)

    def added_bytes_per_token(self) -> int:
        """Bytes DASH-KV stores per cached token beyond plain K/V: the packed key codes of every hashed layer."""
        if self.encoders is None:
            return 0
        return len(self.layout.hashed_layers) * self.layout.num_kv_heads * self.encoders.config.code_bytes
