"""Fitting DASH-KV's optional terms (arXiv 2604.19351) on captured attention, and measuring what each one does.

The encoders stay as trained; what is fitted here lives beside them in ``LayerEncoders`` (``tier2``,
``calibration``) and is used at inference when the ``DecodePolicy`` turns it on:

- calibration weights (``hf_dashkv.selectors.calibrated``): a grid search per hashed layer, in layer order (the temporal
  term reads the previous layer's final selection), for the weights that maximise attention recall at the
  configured budget;
- tier-2 logit terms (``hf_dashkv.selectors.tiers``): least squares per query head against the true logits
  ``q . k * scale`` of the tier-2 keys, then the constant raised by half the residual variance. A least-squares
  fit predicts the mean logit, and ``exp`` of the mean underestimates the mean of ``exp`` (with Gaussian
  residuals by ``exp(var / 2)``): without the shift tier 2 gets too little attention (docs/experiments.md).

Everything runs on "decode-like" positions of real text: one forward pass records the post-RoPE q/k/v of every
hashed layer, and position ``p`` then plays a decode step whose cache holds tokens ``0..p``, through the same
selectors the attention uses (``hf_dashkv.selectors``), layer after layer with one ``DecodeRecord`` per step. The
capture is ``hf_dashkv.capture``'s (the one training uses), which also keeps V (the output error needs it).
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from dataclasses import dataclass

import torch

from hf_dashkv import DecodePolicy, HashEncoders
from hf_dashkv.capture import capture_attention
from hf_dashkv.recall import attention_probs
from hf_dashkv.selection import Selection, combine_group, select
from hf_dashkv.selectors import HashSelector, Selector, hash_selector
from hf_dashkv.selectors.calibrated import calibrate, remember_selection, spatial_votes
from hf_dashkv.selectors.tiers import TieredPlan
from hf_dashkv.step import DecodeRecord, DecodeStep


GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # distance units; the weights act in steps of 1/16


@dataclass
class DecodeSample:
    """One sequence's post-RoPE attention inputs of the hashed layers (``{layer: (q [1, Hq, T, D], k, v
    [1, Hkv, T, D], scale)}``) and the positions that play decode steps."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]
    positions: list[int]


@torch.no_grad()
def capture(model, input_ids: torch.Tensor, layers, positions: int) -> DecodeSample:
    """Record ``layers``' q/k/v for ``input_ids [1, T]``; ``positions`` evenly spaced decode steps in ``[T/2, T)``.

    The second half only: the budget is a share of the context, and a short context is not what it is for.
    """
    length = input_ids.shape[1]
    captured = capture_attention(model, input_ids, max(layers))
    kept = {layer: captured[layer] for layer in layers}
    steps = torch.linspace(length // 2, length - 1, positions).round().long().unique().tolist()
    return DecodeSample(kept, steps)


def _key_codes(encoders: HashEncoders, sample: DecodeSample) -> dict[int, torch.Tensor]:
    return {layer: encoders[layer].encode_keys(k) for layer, (_, k, _, _) in sample.layers.items()}


def _exact(sample: DecodeSample, layer: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention of position ``p`` over tokens ``0..p``: probabilities ``[Hkv, G, p + 1]``, output ``[Hq, D]``."""
    q, k, v, scale = sample.layers[layer]
    probs = attention_probs(q[0, :, p : p + 1], k[0, :, : p + 1], scale)[:, :, 0]  # [Hkv, G, n]
    return probs, (probs @ v[0, :, : p + 1].float()).flatten(0, 1)


def _step(codes, sample: DecodeSample, layer: int, p: int, record: DecodeRecord) -> DecodeStep:
    """Position ``p`` of ``layer`` as a decode step over tokens ``0..p``."""
    q, k, v, scale = sample.layers[layer]
    n = p + 1
    return DecodeStep(q[:, :, p : p + 1], k[:, :, :n], v[:, :, :n], codes[layer][:, :, :n], None, scale, layer, record)


def _decode(selector: Selector, policy: DecodePolicy, step: DecodeStep
            ) -> tuple[torch.Tensor, Selection, Selection | None]:
    """The step's output ``[1, 1, Hq, D]``, tier 1 and tier 2 (``None`` without it), as the attention computes them
    (the PyTorch definition of the selector's plan), leaving the selection for the next layer as the cache does."""
    plan = selector.plan(step, policy)
    if isinstance(plan, TieredPlan):
        tiers = plan.tiers(step)
        out, tier1, tier2 = tiers.output, tiers.tier1, tiers.tier2
    else:
        (out, tier1), tier2 = plan.attend(step), None
    if policy.temporal_calibration:
        remember_selection(step, tier1)
    return out, tier1, tier2


@torch.no_grad()
def fit_calibration(encoders: HashEncoders, samples: list[DecodeSample], config: DecodePolicy, grid=GRID) -> None:
    """Set each hashed layer's calibration weights, in place, to the grid point of highest recall on ``samples``.

    A term that ``config`` leaves off keeps weight 0. Layers go in order, each choosing with the previous layer's
    final (calibrated) selection, as decoding will. Ties keep the smaller weights (the grid starts at 0).
    """
    spatial = grid if config.spatial_calibration else (0.0,)
    temporal = grid if config.temporal_calibration else (0.0,)
    combos = list(itertools.product(spatial, temporal))
    codes = [_key_codes(encoders, sample) for sample in samples]
    previous: dict[tuple[int, int], torch.Tensor] = {}
    for index, layer in enumerate(encoders.layout.hashed_layers):
        selector = HashSelector(encoders[layer])
        steps, gains = [], torch.zeros(len(combos), dtype=torch.float64)
        for s, sample in enumerate(samples):
            for p in sample.positions:
                step = _step(codes[s], sample, layer, p, DecodeRecord())
                per_head = selector.head_distances(step)[1]
                distances = combine_group(per_head, config.group_reduce)
                allowed = step.candidates(config.sink_tokens, config.recent_tokens)
                votes = None
                if config.spatial_calibration:
                    votes = spatial_votes(per_head, allowed, config.budget_tokens(step.n))
                before = previous.get((s, p)) if config.temporal_calibration and index else None
                trials = torch.cat([calibrate(distances, votes, before, ws, wt) for ws, wt in combos])  # [C, Hkv, n]
                chosen = select(trials.unsqueeze(2), config, step.ends).mask(step.n)[:, :, 0]
                mass = _exact(sample, layer, p)[0].sum(1)  # [Hkv, n]: the group's attention on each key
                gains += (chosen * mass).sum((1, 2)).double()
                steps.append((s, step, distances, votes, before))
        best = combos[int(gains.argmax())]
        weights = encoders[layer].calibration
        weights.spatial.fill_(best[0])
        weights.temporal.fill_(best[1])
        for s, step, distances, votes, before in steps:  # this layer's final selection, for the next layer
            chosen = select(calibrate(distances, votes, before, *best).unsqueeze(2), config, step.ends)
            previous[(s, step.n - 1)] = chosen.mask(step.n)[:, :, 0].any(1)


@torch.no_grad()
def fit_tier2(encoders: HashEncoders, samples: list[DecodeSample], config: DecodePolicy) -> None:
    """Set each hashed layer's tier-2 terms, in place, by least squares per query head (see the module docstring).

    The tier-2 rows are those ``config`` gives (after its calibration, with the weights the encoders hold).
    """
    if not config.tier2_budget:
        raise ValueError("fit_tier2 needs a config with tier2_budget > 0: it fits the logit of those rows.")
    layers = encoders.layout.hashed_layers
    heads = encoders.layout.num_heads
    gram = {layer: torch.zeros(heads, 3, 3, dtype=torch.float64) for layer in layers}
    moment = {layer: torch.zeros(heads, 3, dtype=torch.float64) for layer in layers}
    square = {layer: torch.zeros(heads, dtype=torch.float64) for layer in layers}
    count = {layer: torch.zeros(heads, dtype=torch.float64) for layer in layers}
    selectors = {layer: hash_selector(config, encoders[layer]) for layer in layers}
    for sample in samples:
        codes = _key_codes(encoders, sample)
        for p in sample.positions:
            record = DecodeRecord()
            for layer in layers:  # in order: the temporal record of one step goes from layer to layer
                step = _step(codes, sample, layer, p, record)
                tiers = selectors[layer].plan(step, config).tiers(step)
                if config.temporal_calibration:
                    remember_selection(step, tiers.tier1)
                q, k, _, scale = sample.layers[layer]
                kv_heads = k.shape[1]
                query = q[0, :, p].unflatten(0, (kv_heads, -1)).float()  # [Hkv, G, D]
                rows = tiers.tier2.rows[0]  # [Hkv, M]
                keys = k[0].float().gather(1, rows.unsqueeze(-1).expand(-1, -1, k.shape[-1]))  # [Hkv, M, D]
                target = torch.einsum("kgd,kmd->kgm", query, keys).mul(scale).flatten(0, 1).double()  # [Hq, M]
                use = tiers.tier2.valid[0].unsqueeze(1).expand(-1, query.shape[1], -1).flatten(0, 1).double()
                x = tiers.features[0].flatten(0, 1).double() * use.unsqueeze(-1)  # [Hq, M, 3]
                gram[layer] += x.transpose(1, 2) @ x
                moment[layer] += (x * target.unsqueeze(-1)).sum(1)
                square[layer] += (target.square() * use).sum(1)
                count[layer] += use.sum(1)
    for layer in layers:
        # a little ridge: the query norm can be nearly constant for a head, then collinear with the constant
        ridge = 1e-6 * gram[layer].diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1.0)
        lhs = gram[layer] + ridge.view(-1, 1, 1) * torch.eye(3, dtype=torch.float64)
        weight = torch.linalg.solve(lhs, moment[layer])  # [Hq, 3]
        residual = square[layer] - 2 * (weight * moment[layer]).sum(-1) + torch.einsum(
            "hi,hij,hj->h", weight, gram[layer], weight
        )
        weight[:, 1] += residual.clamp(min=0) / count[layer].clamp(min=1) / 2
        encoders[layer].tier2.weight.copy_(weight.float())


def fit_tiers(model, encoders: HashEncoders, sequences, config: DecodePolicy, positions: int = 24,
              grid=GRID) -> HashEncoders:
    """A copy of ``encoders`` with the optional terms that ``config`` turns on fitted on ``sequences``.

    Args:
        model: the model the encoders belong to (any attention implementation; restored afterwards).
        encoders: trained hash encoders; not changed.
        sequences: token ids, each ``[1, T]`` (or ``[T]``); a few of 1-2k tokens are enough.
        config: budget, tier-2 budget and calibration flags to fit for (``tier2_budget=0`` fits no tier 2).
        positions: decode-like positions per sequence. grid: calibration weights to try.
    """
    fitted = copy.deepcopy(encoders)
    samples = [capture(model, ids.view(1, -1), fitted.layout.hashed_layers, positions) for ids in sequences]
    if config.calibrated:
        fit_calibration(fitted, samples, config, grid)
    if config.tier2_budget:
        fit_tier2(fitted, samples, config)
    return fitted


@torch.no_grad()
def evaluate(encoders: HashEncoders, samples: list[DecodeSample], configs: dict[str, DecodePolicy]) -> dict[str, dict]:
    """Per config, means over hashed layers, positions and query heads (each ``[0, 1]``):

    - ``recall``: the full attention mass on the tier-1 rows (what ``hf_dashkv.recall`` measures at inference);
    - ``tiers_mass``: the mass on tier 1 and tier 2 together (``recall`` when tier 2 is off);
    - ``error``: ``|out - full| / |full|`` of the attention output against full attention.
    """
    sums: dict[str, dict[str, float]] = {name: defaultdict(float) for name in configs}
    steps = 0
    layers = encoders.layout.hashed_layers
    selectors = {name: {layer: hash_selector(config, encoders[layer]) for layer in layers}
                 for name, config in configs.items()}
    for sample in samples:
        codes = _key_codes(encoders, sample)
        for p in sample.positions:
            exact = {layer: _exact(sample, layer, p) for layer in layers}
            steps += len(layers)
            for name in configs:
                record = DecodeRecord()
                for layer in layers:  # in order, for the temporal record
                    out, tier1, tier2 = _decode(selectors[name][layer], configs[name],
                                                _step(codes, sample, layer, p, record))
                    probs, full = exact[layer]
                    tier1 = tier1.mask(p + 1)[0].unsqueeze(1)  # [Hkv, 1, n]
                    both = tier1 if tier2 is None else tier1 | tier2.mask(p + 1)[0].unsqueeze(1)
                    out = out[0, 0].float()  # [Hq, D]
                    sums[name]["recall"] += float((probs * tier1).sum(-1).mean())
                    sums[name]["tiers_mass"] += float((probs * both).sum(-1).mean())
                    sums[name]["error"] += float(((out - full).norm(dim=-1) / full.norm(dim=-1)).mean())
    return {name: {metric: total / steps for metric, total in values.items()} for name, values in sums.items()}
