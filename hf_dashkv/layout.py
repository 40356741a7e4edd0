"""ModelLayout: which layers of a model DASH-KV hashes, and the attention shapes it must match.

This module owns one decision: given a transformers config and the dense layers asked for, which layers are
sliding-window (left exact and bounded, as transformers does), which are dense full attention (the
"sandwich"), and which are hashed. The cache and the encoders both build on it, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from transformers.cache_utils import get_layer_types_and_kwargs

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# attention with extra logit terms that selection would silently drop; the attention function also refuses
# any call that carries such terms (hf_dashkv.attention)
ALIBI_MODELS = ("bloom", "mpt")
LEARNED_SINK_MODELS = ("gpt_oss",)
SUPPORTED_LAYOUTS = (
    "decoder-only models whose layers are standard softmax attention (MHA, GQA or MQA) with one head_dim for "
    "keys and values, each layer 'full_attention' or 'sliding_attention' (e.g. Llama, Mistral, Qwen2/3, Gemma 3)"
)


@dataclass(frozen=True)
class ModelLayout:
    """The attention shape of a model, as far as DASH-KV is concerned.

    ``layer_types[i]`` is ``"full_attention"`` or ``"sliding_attention"``; ``hashed_layers`` are the full-attention
    layers that are not dense. Saved with encoders, so a checkpoint can be checked against a model.
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...] = field(default_factory=tuple)
    hashed_layers: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "hashed_layers", tuple(int(i) for i in self.hashed_layers))

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """The full-attention layers that are not hashed."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention" and i not in self.hashed_layers)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "sliding_attention")

    @classmethod
    def from_model_config(cls, model_config, dense_layers: tuple[int, ...] = ()) -> "ModelLayout":
        """Read the layout of ``model_config`` (a transformers ``PretrainedConfig``) and place ``dense_layers``
        (model layer indices, negative ones counting from the end).

        Raises ``ValueError`` for a model whose attention DASH-KV does not support, and for dense layers that are
        out of range or name a sliding-window layer.
        """
        text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
        model_type = getattr(text, "model_type", type(text).__name__)
        problems = []
        if getattr(text, "is_encoder_decoder", False):
            problems.append("it is an encoder-decoder model")
        if getattr(text, "kv_lora_rank", None) is not None:
            problems.append("it uses multi-head latent attention (kv_lora_rank)")
        if getattr(text, "attn_logit_softcapping", None) is not None:
            problems.append("it soft-caps attention logits (attn_logit_softcapping)")
        if getattr(text, "alibi", False) or model_type in ALIBI_MODELS:
            problems.append("it adds a position bias to attention logits (ALiBi)")
        if model_type in LEARNED_SINK_MODELS:
            problems.append("its attention has learned sink logits (s_aux)")
        num_layers = getattr(text, "num_hidden_layers", None)
        num_heads = getattr(text, "num_attention_heads", None)
        if num_layers is None or num_heads is None:
            problems.append("its config has no num_hidden_layers / num_attention_heads")
        # the same reading of layer types that transformers' own DynamicCache uses (sliding_window, chunks, ...)
        layer_types = tuple(get_layer_types_and_kwargs(text)[0]) if num_layers else ()
        unknown = sorted({t for t in layer_types} - set(SUPPORTED_LAYER_TYPES))
        if unknown:
            problems.append(f"it has layer types {unknown}")
        if problems:
            raise ValueError(
                f"DASH-KV does not support model type {model_type!r}: {'; '.join(problems)}. Supported: {SUPPORTED_LAYOUTS}."
            )
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"DASH-KV does not support model type {model_type!r}: {num_heads} query heads do not split evenly "
                f"over {num_kv_heads} KV heads. Supported: {SUPPORTED_LAYOUTS}."
            )
        dense = resolve_layers(dense_layers, num_layers)
        sliding = [i for i in dense if layer_types[i] == "sliding_attention"]
        if sliding:
            all_sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
            raise ValueError(
                f"dense_layers names sliding-window layers {sliding}: those always stay exact and "
                f"bounded, DASH-KV only runs on full-attention layers. This model's sliding layers are {all_sliding}; "
                "remove them from dense_layers."
            )
        if layer_types and "full_attention" not in layer_types:
            window = getattr(text, "sliding_window", None)
            raise ValueError(
                f"Every layer of this {model_type!r} model is sliding-window (sliding_window={window}), so DASH-KV has "
                "nothing to hash and would only add work. If the model attends to the whole context (e.g. Mistral "
                "v0.2+, whose config may still carry a window), set model.config.sliding_window = None before "
                "building the cache; otherwise use transformers' DynamicCache."
            )
        hashed = tuple(i for i, t in enumerate(layer_types) if t == "full_attention" and i not in dense)
        return cls(
            model_type=model_type,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layer_types=layer_types,
            hashed_layers=hashed,
        )

    def mismatches(self, other: "ModelLayout") -> list[str]:
        """Human-readable differences that make encoders for ``other`` unusable on ``self``."""
        out = []
        if self.model_type != other.model_type:
            out.append(f"model_type: model is {self.model_type!r}, encoders are for {other.model_type!r}")
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: model has {mine}, encoders have {theirs}")
        return out

    def hashing_only(self, layers: tuple[int, ...]) -> "ModelLayout":
        """This layout with only ``layers`` (those that have encoders) hashed; the other full layers go dense."""
        return replace(self, hashed_layers=tuple(i for i in self.hashed_layers if i in set(layers)))


def resolve_layers(layers, num_layers: int) -> tuple[int, ...]:
    """Layer indices (negative ones count from the end) as sorted non-negative ones; raises ``ValueError`` for one
    outside ``[-num_layers, num_layers)``."""
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(
            f"dense_layers has {bad}, outside this model's {num_layers} layers; use indices in "
            f"[0, {num_layers - 1}] (or negative ones counting from the end)."
        )
    return tuple(sorted({int(i) % num_layers for i in layers}))
