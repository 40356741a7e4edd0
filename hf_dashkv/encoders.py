"""Hash encoders: a linear key encoder per KV head and an MLP query encoder per query head, per layer.

DASH-KV (arXiv 2604.19351, §3) hashes keys once, cheaply, and queries with more capacity, into one shared
Hamming space per KV head. Both encoders see post-RoPE vectors, the ones attention scores use.

One choice of ours on top of the paper: the query encoder is ``linear(q) + mlp(q)`` with the MLP's last
layer starting at zero. Untrained encoders (``HashEncoders.random``) then give the query exactly the random
projection of its KV head's keys, i.e. SimHash, which is the baseline, and training starts from it.

Each layer also holds the paper's optional terms, fitted after training (``lightning_modules.calibration``) and
used when the ``DecodePolicy`` turns them on: the tier-2 logit (``hf_dashkv.selectors.tiers``) and the spatial /
temporal calibration discounts (``hf_dashkv.selectors.calibrated``).

A folder of encoders holds ``config.json`` (the layout and the :class:`~hf_dashkv.config.EncoderConfig`: what training
fixed), ``model.safetensors`` and, optionally, ``decode_policy.json``: the policy its authors recommend, read into
``HashEncoders.policy``.
"""

import copy
import json
import math
from pathlib import Path

import safetensors.torch
import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from torch import nn

from .codes import pack_signs
from .config import EncoderConfig
from .layout import ModelLayout
from .policy import POLICY_NAME, DecodePolicy

WEIGHTS_NAME = "model.safetensors"


def _neutral_if_absent(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name, buffer in module.named_buffers(recurse=False):
        state_dict.setdefault(prefix + name, buffer)


class NeutralBuffers(nn.Module):
    """A module whose buffers may be absent from checkpoints written before they existed (the shipped encoders
    among them): loading one keeps their neutral values, with which the module computes what it did before.
    Every parameter still loads strictly."""

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_pre_hook(_neutral_if_absent)


class KeyEncoder(NeutralBuffers):
    """``k -> (k / s[h]) @ W[h] + b[h]`` for each KV head ``h``: ``[B, Hkv, T, D] -> [B, Hkv, T, bits]`` (pre-sign).

    ``s`` (``input_scale``, a buffer) is a fixed per-head input scale, the keys' mean norm, set from data before
    training (``lightning_modules``) so that the relaxed codes start unsaturated and the optimizer's steps are of
    the inputs' size; neutral: 1.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, bits: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_kv_heads, head_dim, bits))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads, bits))
        self.register_buffer("input_scale", torch.ones(num_kv_heads))

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        x = keys.to(self.weight.dtype) / self.input_scale[:, None, None]
        return torch.matmul(x, self.weight) + self.bias[:, None]


class QueryEncoder(NeutralBuffers):
    """Per query head: ``x = q / s[h]``, ``x -> x @ P[h] + MLP_h(x)``: ``[..., Hq, D] -> [..., Hq, bits]`` (pre-sign).

    The MLP is ``D -> hidden -> hidden -> bits`` with SiLU; ``hidden = 0`` leaves only the linear map. ``s``
    (``input_scale``) as for :class:`KeyEncoder`: the queries' mean norm per head; neutral 1.
    """

    def __init__(self, num_heads: int, head_dim: int, bits: int, hidden: int):
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(num_heads, head_dim, bits))
        self.register_buffer("input_scale", torch.ones(num_heads))
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
        # batched matmuls over the heads, also at decode (M = batch): measured faster there than a broadcast
        # multiply-sum, by 2x for the linear map and 3-7x for the MLP, whose broadcast materialised [H, D, hidden]
        q = (queries.to(self.proj.dtype) / self.input_scale[:, None]).reshape(-1, heads, dim).transpose(0, 1)  # [H, M, D]
        out = torch.bmm(q, self.proj)
        if self.hidden:
            x = nn.functional.silu(torch.baddbmm(self.b1.unsqueeze(1), q, self.w1))
            x = nn.functional.silu(torch.baddbmm(self.b2.unsqueeze(1), x, self.w2))
            out = torch.baddbmm(out + self.b3.unsqueeze(1), x, self.w3)
        return out.transpose(0, 1).reshape(*lead, heads, -1)


class FittedTerms(NeutralBuffers):
    """Optional terms fitted after the encoders are trained (least squares, grid search), not by gradient.

    They are buffers: saved and loaded with the encoders, moved with them, and never expected to get a
    gradient (DDP would wait for one). Neutral, each term acts as if it were off.
    """


class Tier2Terms(FittedTerms):
    """Per query head, the tier-2 logit ``features @ weight[h]`` (``hf_dashkv.selectors.tiers``): ``weight [Hq, 3]``
    weighs the hash similarity, a constant and the query norm. Neutral (unfitted): ``[0, -inf, 0]``, which
    gives tier-2 rows no attention."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.register_buffer("weight", torch.tensor([0.0, -math.inf, 0.0]).repeat(num_heads, 1))

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.weight).all())


class CalibrationWeights(FittedTerms):
    """The layer's spatial and temporal distance discounts (``hf_dashkv.selectors.calibrated``), scalars in distance
    units, >= 0. Neutral: 0, plain Hamming distance."""

    def __init__(self):
        super().__init__()
        self.register_buffer("spatial", torch.zeros(()))
        self.register_buffer("temporal", torch.zeros(()))


class LayerEncoders(nn.Module):
    """The key and query encoders of one model layer, the packed codes they produce, and its fitted terms."""

    def __init__(self, layout: ModelLayout, config: EncoderConfig):
        super().__init__()
        self.group_size = layout.group_size
        self.key = KeyEncoder(layout.num_kv_heads, layout.head_dim, config.bits)
        self.query = QueryEncoder(layout.num_heads, layout.head_dim, config.bits, config.query_hidden)
        self.tier2 = Tier2Terms(layout.num_heads)
        self.calibration = CalibrationWeights()

    @torch.no_grad()
    def encode_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys ``[B, Hkv, T, D]`` -> packed codes ``[B, Hkv, T, bits // 8]`` uint8: the signs of
        :meth:`key_projections`."""
        return pack_signs(self.key_projections(keys))

    @torch.no_grad()
    def key_projections(self, keys: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys ``[..., Hkv, T, D]`` -> the key encoder's output before the sign ``[..., Hkv, T, bits]``
        (a compiled writer packs the signs itself: ``kernels.store_paged``)."""
        return self.key(keys)

    @torch.no_grad()
    def encode_query(self, query: torch.Tensor) -> torch.Tensor:
        """One decode step's post-RoPE queries ``[B, Hq, D]`` -> codes ``[B, Hkv, G, bits // 8]`` uint8.

        Query head ``h`` belongs to KV head ``h // G``, the grouping transformers' ``repeat_kv`` uses.
        """
        codes = pack_signs(self.query(query))
        return codes.unflatten(1, (-1, self.group_size))

    def shard(self, kv_heads: range) -> "LayerEncoders":
        """These encoders for the consecutive KV heads ``kv_heads`` and their query heads (``G * kv_heads.start`` to
        ``G * kv_heads.stop``): what one tensor-parallel rank holds when heads are split by KV head, as vLLM does.

        Every selection of the library is made per KV head from that head's keys and its group's queries, so the
        shard's codes, and what a rank selects with them, are the head slices of the whole layer's. A new module;
        ``self`` is unchanged.
        """
        total = self.key.weight.shape[0]
        if kv_heads.step != 1 or not 0 <= kv_heads.start < kv_heads.stop <= total:
            raise ValueError(f"LayerEncoders.shard({kv_heads}): give consecutive KV heads within range({total}).")
        group = self.group_size
        heads = {"key": slice(kv_heads.start, kv_heads.stop),
                 "query": slice(group * kv_heads.start, group * kv_heads.stop)}
        heads["tier2"] = heads["query"]
        part = copy.deepcopy(self)
        for module_name, rows in heads.items():
            module = part.get_submodule(module_name)
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                sliced = tensor.detach()[rows].clone()
                setattr(module, name, nn.Parameter(sliced, tensor.requires_grad) if isinstance(tensor, nn.Parameter)
                        else sliced)
        return part


class HashEncoders(nn.Module, PyTorchModelHubMixin, library_name="hf_dashkv", tags=["dash-kv", "kv-cache"]):
    """All of a model's hash encoders: one :class:`LayerEncoders` per hashed layer.

    ``layout`` records the model they belong to (and which layers have encoders), ``config`` the
    :class:`EncoderConfig` they were trained with (``encoder_config`` at construction); both are saved in
    ``config.json`` beside ``model.safetensors`` by ``save_pretrained`` / ``push_to_hub`` and restored by
    ``from_pretrained``, which loads safetensors only and strictly (only buffers newer than a checkpoint may be
    absent from it: see :class:`NeutralBuffers`). ``policy``, the recommended :class:`DecodePolicy` (or ``None``),
    travels in a file of its own, ``decode_policy.json``.
    """

    def __init__(self, layout: ModelLayout, encoder_config: EncoderConfig):
        # not named `config`: the Hub mixin would then save that dataclass alone and drop `layout`
        super().__init__()
        self.layout = layout
        self.config = encoder_config
        self.policy: DecodePolicy | None = None
        self.layers = nn.ModuleDict({str(i): LayerEncoders(layout, encoder_config) for i in layout.hashed_layers})

    def __getitem__(self, layer_idx: int) -> LayerEncoders:
        return self.layers[str(layer_idx)]

    @classmethod
    def random(cls, model_config, config: EncoderConfig = EncoderConfig(), dense_layers: tuple[int, ...] = (),
               seed: int = 0) -> "HashEncoders":
        """Untrained encoders: Gaussian random projections shared by keys and queries (SimHash).

        Args:
            model_config: the transformers config of the model the encoders are for.
            config: bits and query width.
            dense_layers: full-attention layers that get no encoders (they always run dense).
            seed: seeds the projections, so the same call gives the same encoders.
        """
        layout = ModelLayout.from_model_config(model_config, dense_layers)
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

    def check_compatible(self, model_config) -> None:
        """Raise ``ValueError`` naming every mismatch between these encoders and a model."""
        layout = ModelLayout.from_model_config(model_config)
        problems = layout.mismatches(self.layout)
        if problems:
            raise ValueError(
                f"These hash encoders do not fit this model ({layout.model_type}, {layout.num_layers} layers): "
                + "; ".join(problems)
                + ". Use encoders trained for this model, or HashEncoders.random(model.config, ...)."
            )

    def check_fitted(self, policy: DecodePolicy, layers: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if ``policy`` turns on tier 2 for ``layers`` whose tier-2 terms were never fitted."""
        unfitted = [i for i in layers if not self[i].tier2.fitted]
        if policy.tier2_budget and unfitted:
            raise ValueError(
                f"DecodePolicy.tier2_budget={policy.tier2_budget!r}, but the tier-2 logit terms of layers {unfitted} "
                "were never fitted. Fit them (`dashkv fit-terms`), or set tier2_budget=0."
            )

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        if self.policy is not None:
            self.policy.save(save_directory)

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
        def fetch(filename: str, required: bool = True) -> Path | None:
            if Path(model_id).is_dir():
                path = Path(model_id) / filename
                if required and not path.is_file():
                    raise FileNotFoundError(f"{path} not found: hf_dashkv loads encoders from safetensors only.")
                return path if path.is_file() else None
            try:
                return Path(hf_hub_download(
                    repo_id=model_id, filename=filename, revision=revision, cache_dir=cache_dir,
                    force_download=force_download, token=token, local_files_only=local_files_only,
                ))
            except RemoteEntryNotFoundError:  # not in the repo (offline and uncached is an error, not "absent")
                if required:
                    raise
                return None

        recommended = fetch(POLICY_NAME, required=False)
        policy = DecodePolicy.load(recommended) if recommended is not None else None
        if "encoder_config" not in model_kwargs:
            # written before the split: one `dashkv_config` held the encoders' shape and the decode policy
            legacy = json.loads(fetch("config.json").read_text()).get("dashkv_config")
            if legacy is None or "layout" not in model_kwargs:
                raise ValueError(
                    f"{model_id} has no usable config.json (layout and encoder_config): it was not written by "
                    "HashEncoders.save_pretrained."
                )
            model_kwargs["encoder_config"], legacy_policy = split_legacy_config(legacy, str(model_id))
            policy = policy or legacy_policy
        encoders = cls(**model_kwargs)
        encoders.policy = policy
        weights = fetch(WEIGHTS_NAME)
        try:
            state = safetensors.torch.load_file(str(weights), device=map_location)
        except Exception as error:  # safetensors raises its own error type, without the path
            raise ValueError(
                f"{weights} could not be read ({error}): the file is truncated or damaged. Download it again, or "
                "re-export the encoders from their training checkpoint (dashkv export)."
            ) from error
        expected = {name: tuple(p.shape) for name, p in encoders.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in state.items()}
        optional = {  # older checkpoints lack them: they keep their neutral values (NeutralBuffers)
            f"{prefix}.{name}" for prefix, module in encoders.named_modules() if isinstance(module, NeutralBuffers)
            for name, _ in module.named_buffers(recurse=False)
        }
        if {n: shape for n, shape in expected.items() if n in found or n not in optional} != found:
            missing = sorted(set(expected) - set(found) - optional)[:5]
            unexpected = sorted(set(found) - set(expected))[:5]
            reshaped = [f"{n}: {found[n]} vs {expected[n]}" for n in expected if n in found and found[n] != expected[n]][:5]
            raise ValueError(
                f"{weights} does not match its config.json: missing {missing}, unexpected {unexpected}, "
                f"wrong shapes {reshaped}. The checkpoint is damaged or was edited; re-export it."
            )
        # only the unfitted tier-2 term is infinite by design (Tier2Terms); anything else non-finite breaks every code
        broken = sorted(
            name for name, t in state.items()
            if t.is_floating_point() and (t.isnan().any() or (t.isinf().any() and not name.endswith("tier2.weight")))
        )
        if broken:
            raise ValueError(
                f"{weights} holds NaN or infinite values in {broken[:5]}{' ...' if len(broken) > 5 else ''}: every "
                "code would be 0 and selection meaningless. The training run diverged or the file was damaged; "
                "re-export from an earlier checkpoint."
            )
        encoders.load_state_dict(state, strict=strict)
        return encoders


# the decode-policy fields of the combined config encoders were saved with before the split (and its baseline knobs,
# which belong to selectors now)
_LEGACY_SELECTOR_FIELDS = ("selector", "page_size")


def split_legacy_config(values: dict, source: str) -> tuple[EncoderConfig, DecodePolicy]:
    """A pre-split ``dashkv_config`` -> (what training fixed, the decode policy it carried, now a recommendation)."""
    values = dict(values)
    if values.get("selector", "hash") != "hash":
        raise ValueError(
            f"{source}: its config.json names selector {values['selector']!r}, but encoders are for hashing. Baselines "
            "are selectors now, not part of encoders: delete 'selector' and 'page_size' from its dashkv_config, and "
            "pass the baseline to the cache, e.g. DashKVCache(model.config, selector=QuestSelector(page_size=16))."
        )
    for name in _LEGACY_SELECTOR_FIELDS:
        values.pop(name, None)
    shape = {name: values.pop(name) for name in ("bits", "query_hidden") if name in values}
    return EncoderConfig(**shape), DecodePolicy.from_dict(values, source=f"{source} (config.json dashkv_config)")
