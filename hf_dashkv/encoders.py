"""Hash encoders: a linear key encoder per KV head and an MLP query encoder per query head, per layer.

DASH-KV (arXiv 2604.19351, §3) hashes keys once, cheaply, and queries with more capacity, into one shared
Hamming space per KV head. Both encoders see post-RoPE vectors, the ones attention scores use.

One choice of ours on top of the paper: the query encoder is ``linear(q) + mlp(q)`` with the MLP's last
layer starting at zero. Untrained encoders (``HashEncoders.random``) then give the query exactly the random
projection of its KV head's keys, i.e. SimHash, which is the baseline, and training starts from it.
"""

import math
from pathlib import Path

import safetensors.torch
import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from torch import nn

from .codes import pack_signs
from .config import DashKVConfig
from .layout import ModelLayout

WEIGHTS_NAME = "model.safetensors"


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-head linear map: ``x [..., H, T, D] @ weight [H, D, K] -> [..., H, T, K]``.

    At decode (``T == 1``) a broadcast multiply-sum: the work is tiny, and a batched matmul there costs ~15x
    more in waking its thread pool (measured ~48 us vs ~3 us on 2 cores with OMP_WAIT_POLICY=PASSIVE).
    """
    if x.shape[-2] == 1:
        return (x.transpose(-1, -2) * weight).sum(-2, keepdim=True)
    return torch.matmul(x, weight)


class KeyEncoder(nn.Module):
    """``k -> k @ W[h] + b[h]`` for each KV head ``h``: ``[B, Hkv, T, D] -> [B, Hkv, T, bits]`` (pre-sign)."""

    def __init__(self, num_kv_heads: int, head_dim: int, bits: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_kv_heads, head_dim, bits))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads, bits))

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        return project(keys.to(self.weight.dtype), self.weight) + self.bias[:, None]


class QueryEncoder(nn.Module):
    """Per query head: ``q -> q @ P[h] + MLP_h(q)``: ``[..., Hq, D] -> [..., Hq, bits]`` (pre-sign).

    The MLP is ``D -> hidden -> hidden -> bits`` with SiLU; ``hidden = 0`` leaves only the linear map.
    """

    def __init__(self, num_heads: int, head_dim: int, bits: int, hidden: int):
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(num_heads, head_dim, bits))
        self.hidden = hidden
        if hidden:
            self.w1 = nn.Parameter(torch.zeros(num_heads, head_dim, hidden))
            self.b1 = nn.Parameter(torch.zeros(num_heads, hidden))
            self.w2 = nn.Parameter(torch.zeros(num_heads, hidden, hidden))
            self.b2 = nn.Parameter(torch.zeros(num_heads, hidden))
            self.w3 = nn.Parameter(torch.zeros(num_heads, hidden, bits))
            self.b3 = nn.Parameter(torch.zeros(num_heads, bits))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        lead, (heads, dim) = queries.shape[:-2], queries.shape[-2:]
        q = queries.to(self.proj.dtype).reshape(-1, heads, dim).transpose(0, 1)  # [H, M, D]
        out = project(q, self.proj)
        if self.hidden:
            x = nn.functional.silu(project(q, self.w1) + self.b1.unsqueeze(1))
            x = nn.functional.silu(project(x, self.w2) + self.b2.unsqueeze(1))
            out = out + project(x, self.w3) + self.b3.unsqueeze(1)
        return out.transpose(0, 1).reshape(*lead, heads, -1)


class LayerEncoders(nn.Module):
    """The key and query encoders of one model layer, and the packed codes they produce."""

    def __init__(self, layout: ModelLayout, config: DashKVConfig):
        super().__init__()
        self.group_size = layout.group_size
        self.key = KeyEncoder(layout.num_kv_heads, layout.head_dim, config.bits)
        self.query = QueryEncoder(layout.num_heads, layout.head_dim, config.bits, config.query_hidden)

    @torch.no_grad()
    def encode_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys ``[B, Hkv, T, D]`` -> packed codes ``[B, Hkv, T, bits // 8]`` uint8."""
        return pack_signs(self.key(keys))

    @torch.no_grad()
    def encode_query(self, query: torch.Tensor) -> torch.Tensor:
        """One decode step's post-RoPE queries ``[B, Hq, D]`` -> codes ``[B, Hkv, G, bits // 8]`` uint8.

        Query head ``h`` belongs to KV head ``h // G``, the grouping transformers' ``repeat_kv`` uses.
        """
        codes = pack_signs(self.query(query))
        return codes.unflatten(1, (-1, self.group_size))


class HashEncoders(nn.Module, PyTorchModelHubMixin, library_name="hf_dashkv", tags=["dash-kv", "kv-cache"]):
    """All of a model's hash encoders: one :class:`LayerEncoders` per hashed layer.

    ``layout`` records the model they belong to and ``config`` (``dashkv_config`` at construction) the DashKVConfig they were made with; both are
    saved in ``config.json`` beside ``model.safetensors`` by ``save_pretrained`` / ``push_to_hub`` and restored by
    ``from_pretrained``, which loads safetensors only and strictly.
    """

    def __init__(self, layout: ModelLayout, dashkv_config: DashKVConfig):
        # not named `config`: the Hub mixin would then save that dataclass alone and drop `layout`
        super().__init__()
        self.layout = layout
        self.config = dashkv_config
        self.layers = nn.ModuleDict({str(i): LayerEncoders(layout, dashkv_config) for i in layout.hashed_layers})

    def __getitem__(self, layer_idx: int) -> LayerEncoders:
        return self.layers[str(layer_idx)]

    @classmethod
    def random(cls, model_config, config: DashKVConfig, seed: int = 0) -> "HashEncoders":
        """Untrained encoders: Gaussian random projections shared by keys and queries (SimHash).

        Args:
            model_config: the transformers config of the model the encoders are for.
            config: bits, query width and dense layers.
            seed: seeds the projections, so the same call gives the same encoders.
        """
        layout = ModelLayout.from_model_config(model_config, config)
        encoders = cls(layout, config)
        generator = torch.Generator().manual_seed(seed)
        for layer in encoders.layers.values():
            key_proj = torch.randn(layout.num_kv_heads, layout.head_dim, config.bits, generator=generator)
            layer.key.weight.data.copy_(key_proj)
            layer.query.proj.data.copy_(key_proj.repeat_interleave(layout.group_size, dim=0))
            if config.query_hidden:
                # hidden layers get a usual fan-in init so that training can move them; w3 = 0 keeps the
                # untrained query code exactly the key projection's
                for weight in (layer.query.w1, layer.query.w2):
                    fan_in = weight.shape[1]
                    weight.data.copy_(torch.randn(weight.shape, generator=generator) / math.sqrt(fan_in))
        return encoders

    def check_compatible(self, model_config, config: DashKVConfig) -> None:
        """Raise ``ValueError`` naming every mismatch between these encoders and a model + config."""
        layout = ModelLayout.from_model_config(model_config, config)
        problems = layout.mismatches(self.layout)
        if config.bits != self.config.bits:
            problems.append(f"bits: config has {config.bits}, encoders have {self.config.bits}")
        if config.query_hidden != self.config.query_hidden:
            problems.append(f"query_hidden: config has {config.query_hidden}, encoders have {self.config.query_hidden}")
        if problems:
            raise ValueError(
                f"These hash encoders do not fit this model/config ({layout.model_type}, {layout.num_layers} layers): "
                + "; ".join(problems)
                + ". Use encoders trained for this model, or HashEncoders.random(model.config, config)."
            )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ) -> "HashEncoders":
        # Overrides the mixin so that nothing is ever unpickled and a wrong checkpoint never loads silently.
        if "layout" not in model_kwargs or "dashkv_config" not in model_kwargs:
            raise ValueError(
                f"{model_id} has no usable config.json (layout and config): it was not written by "
                "HashEncoders.save_pretrained."
            )
        encoders = cls(**model_kwargs)
        if Path(model_id).is_dir():
            weights = Path(model_id) / WEIGHTS_NAME
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found: hf_dashkv loads encoders from safetensors only.")
        else:
            weights = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        state = safetensors.torch.load_file(str(weights), device=map_location)
        expected = {name: tuple(p.shape) for name, p in encoders.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in state.items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))[:5]
            unexpected = sorted(set(found) - set(expected))[:5]
            reshaped = [f"{n}: {found[n]} vs {expected[n]}" for n in expected if n in found and found[n] != expected[n]][:5]
            raise ValueError(
                f"{weights} does not match its config.json: missing {missing}, unexpected {unexpected}, "
                f"wrong shapes {reshaped}. The checkpoint is damaged or was edited; re-export it."
            )
        encoders.load_state_dict(state, strict=strict)
        return encoders
