"""Spatial and temporal calibration, the optional terms' storage in the encoders, and their fitting."""

import safetensors.torch
import torch

from dataclasses import replace

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, kernels, with_cache
from hf_dashkv.embedded import shipped_encoders
from hf_dashkv.selection import Selection, select_step
from hf_dashkv.selectors import CalibratedSelector, HashSelector
from hf_dashkv.selectors.calibrated import calibrate, remember_selection, spatial_votes
from hf_dashkv.step import DecodeRecord, DecodeStep
from tests.hf_dashkv.test_generate import prompt
from tests.hf_dashkv.selectors.test_tiers import ENCODERS, decode_inputs, random_layer
from tests.tiny import CONFIGS, SelectionLog, tiny_model

BOTH = DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, spatial_calibration=True, temporal_calibration=True)


def test_zero_weights_select_exactly_what_plain_hashing_selects():
    layer = random_layer()
    query, key, value = decode_inputs(batch=2, n=60, seed=3)
    codes = layer.encode_keys(key)
    first = torch.tensor([0, 9])
    valid = torch.arange(60) >= first.unsqueeze(1)  # left padding in the second row
    earlier = Selection(torch.tensor([[[30, 31, 32]]]).expand(2, 1, 3), torch.ones(2, 1, 3, dtype=torch.bool))
    record = DecodeRecord(previous=(0, 60, earlier.mask(60).any(1)))  # a previous layer's: weight 0 ignores it
    step = DecodeStep(query, key, value, codes, valid, 0.25, 1, record)
    calibrated = CalibratedSelector(layer).plan(step, BOTH).select(step)
    step = DecodeStep(query, key, value, codes, valid, 0.25, 1)
    plain = HashSelector(layer).plan(step, BOTH).select(step)
    rows, ok = plain.rows, plain.valid
    assert torch.equal(calibrated.rows, rows) and torch.equal(calibrated.valid, ok)
    if kernels.numba is not None:  # the fused kernel's selection too, ties included
        _, fast_rows, fast_ok = kernels.decode_attention(query, layer.encode_query(query[:, :, 0]), key, value, codes,
                                                         first, 2, 4, 4, "sum", 0.25)
        assert torch.equal(fast_ok, ok) and torch.equal(fast_rows[fast_ok], rows[ok])


def test_a_large_spatial_weight_selects_the_key_every_head_votes_for():
    # one KV head, two query heads, budget 2: key 6 is second nearest for both heads, yet its summed distance (4)
    # loses to keys 5 and 7 (3 each), which only one head ranks in its two nearest
    policy = DecodePolicy(budget=2, sink_tokens=0, recent_tokens=1, spatial_calibration=True)
    per_head = torch.full((1, 1, 2, 10), 8, dtype=torch.int32)
    per_head[0, 0, 0, 5:8] = torch.tensor([0, 2, 3])
    per_head[0, 0, 1, 5:8] = torch.tensor([3, 2, 0])
    distances = per_head.sum(2)
    candidates = torch.arange(10).lt(9).unsqueeze(0)  # all but the recent window
    votes = spatial_votes(per_head, candidates, 2)
    assert votes[0, 5:8].tolist() == [1, 2, 1] and int(votes.sum()) == 4

    def nearest_set(weight):
        selection = select_step(calibrate(distances, votes, None, weight, 0.0), policy.sink_tokens,
                                policy.recent_tokens, policy.budget_tokens(10))
        return set(selection.rows[0, 0][selection.valid[0, 0]].tolist()) - {9}  # without the recent window

    assert nearest_set(0.0) == {5, 7}
    assert 6 in nearest_set(8.0)


def test_the_temporal_record_is_per_step_and_follows_layer_order():
    policy = DecodePolicy(budget=1, sink_tokens=1, recent_tokens=1, temporal_calibration=True)
    selector = CalibratedSelector(random_layer())
    record = DecodeRecord()

    def step(layer_idx, n=6, batch=1, record=record):
        query, key, value = decode_inputs(batch=batch, n=n)
        return DecodeStep(query, key, value, selector.encoders.encode_keys(key), None, 0.25, layer_idx, record)

    third = step(3)
    chosen = selector.plan(third, policy).select(third)
    remember_selection(third, chosen)  # the cache's observer: layer 3 leaves its selection for the next hashed layer
    mask = selector.previous(step(5))
    assert torch.equal(mask, chosen.mask(6).any(1))  # any KV head; unused slots are not selections
    assert mask.tolist()[0][0] and mask.tolist()[0][5]  # its sink and recent token among them
    assert selector.previous(step(3)) is None  # the same layer: a later step
    assert selector.previous(step(1)) is None  # an earlier layer: a new step began
    assert selector.previous(step(5, n=7)) is None  # another cache length: another step
    assert selector.previous(step(5, record=DecodeRecord())) is None  # another cache
    assert selector.previous(step(5, batch=2)) is None


def test_a_large_temporal_weight_makes_a_layer_choose_from_the_previous_layers_selection():
    policy = replace(BOTH, spatial_calibration=False)
    model = tiny_model("llama-gqa")
    encoders = HashEncoders.random(model.config, ENCODERS)
    for i in encoders.layout.hashed_layers:
        encoders[i].calibration.temporal.fill_(1000.0)
    cache = DashKVCache(model.config, encoders, policy)
    assert remember_selection in cache.record.observers  # temporal calibration's memory
    with cache.observing(SelectionLog()) as log:
        model.generate(**prompt(batch=1), max_new_tokens=4, do_sample=False, pad_token_id=0, **with_cache(cache))
    n = cache.get_seq_length()
    previous = log.last[1].mask(n).any(1)  # the last step's selections
    for layer in (2, 3):
        rows, ok = log.last[layer].rows, log.last[layer].valid
        assert previous[0, rows[0, :, 6:][ok[0, :, 6:]]].all()  # every budget row (after 2 sinks + 4 recent)
        previous = log.last[layer].mask(n).any(1)


def test_the_fitted_terms_are_saved_and_loaded(tmp_path):
    config = EncoderConfig(bits=16, query_hidden=0)
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), config)
    enc[2].tier2.weight.normal_()
    enc[3].calibration.spatial.fill_(2.5)
    enc[1].calibration.temporal.fill_(0.5)
    enc.save_pretrained(tmp_path)
    loaded = HashEncoders.from_pretrained(tmp_path)
    assert torch.equal(loaded[2].tier2.weight, enc[2].tier2.weight) and loaded[2].tier2.fitted
    assert float(loaded[3].calibration.spatial) == 2.5 and float(loaded[1].calibration.temporal) == 0.5


def test_encoders_saved_before_the_fitted_terms_still_load(tmp_path):
    config = EncoderConfig(bits=16, query_hidden=0)
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), config)
    enc.save_pretrained(tmp_path)
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    old = {name: t for name, t in state.items() if ".tier2." not in name and ".calibration." not in name}
    assert len(old) < len(state)
    safetensors.torch.save_file(old, tmp_path / "model.safetensors")
    loaded = HashEncoders.from_pretrained(tmp_path)
    assert torch.equal(loaded[1].key.weight, enc[1].key.weight)
    assert not loaded[1].tier2.fitted and float(loaded[1].calibration.spatial) == 0.0  # neutral: as if off
    HashEncoders.random(CONFIGS["llama-gqa"](), config).load_state_dict(old, strict=True)  # e.g. from a checkpoint
    assert HashEncoders.from_pretrained(str(shipped_encoders("smollm2-135m"))).layout.num_layers == 30


def test_fitting_sets_every_term_and_tier_two_adds_mass():
    from lightning_modules.calibration import capture, evaluate, fit_tiers

    model = tiny_model("llama-gqa")
    policy = DecodePolicy(budget=6, sink_tokens=2, recent_tokens=4, dense_layers=(0,), tier2_budget=6,
                          spatial_calibration=True, temporal_calibration=True)
    encoders = HashEncoders.random(model.config, ENCODERS, policy.dense_layers)
    ids = [torch.randint(3, 97, (1, 160), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    fitted = fit_tiers(model, encoders, ids, policy, positions=6, grid=(0.0, 1.0, 4.0))
    assert model.config._attn_implementation == "dashkv"
    assert not encoders[1].tier2.fitted  # the input is left as it was
    for i in fitted.layout.hashed_layers:
        assert fitted[i].tier2.fitted
    samples = [capture(model, x, fitted.layout.hashed_layers, 6) for x in ids]
    plain = replace(policy, tier2_budget=0, spatial_calibration=False, temporal_calibration=False)
    results = evaluate(fitted, samples, {"plain": plain, "fitted": policy})
    assert results["fitted"]["tiers_mass"] > results["fitted"]["recall"]


def test_the_calibration_fit_picks_the_grid_point_of_highest_recall():
    from lightning_modules.calibration import capture, evaluate, fit_calibration

    model = tiny_model("llama-gqa")
    # spatial only: no term reads another layer, so each layer's weight moves only that layer's recall
    policy = DecodePolicy(budget=6, sink_tokens=2, recent_tokens=4, dense_layers=(0,), spatial_calibration=True)
    encoders = HashEncoders.random(model.config, ENCODERS, policy.dense_layers)
    ids = [torch.randint(3, 97, (1, 160), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    samples = [capture(model, x, encoders.layout.hashed_layers, 6) for x in ids]
    grid = (0.0, 1.0, 4.0, 16.0)
    fit_calibration(encoders, samples, policy, grid)
    fitted_recall = evaluate(encoders, samples, {"c": policy})["c"]["recall"]
    chosen = {i: float(encoders[i].calibration.spatial) for i in encoders.layout.hashed_layers}
    assert set(chosen.values()) - {0.0}, "every layer kept weight 0: the test would not tell a fit from none"
    for i in encoders.layout.hashed_layers:
        for weight in grid:
            encoders[i].calibration.spatial.fill_(weight)
            assert evaluate(encoders, samples, {"c": policy})["c"]["recall"] <= fitted_recall + 1e-7, (i, weight)
        encoders[i].calibration.spatial.fill_(chosen[i])
