import pytest

from hf_dashkv import DashKVConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=60), "multiple of 8"),
        (dict(bits=0), "multiple of 8"),
        (dict(budget=0), "must be > 0"),
        (dict(budget=-3), "must be > 0"),
        (dict(budget=1.5), r"\(0, 1\)"),
        (dict(budget=0.0), r"\(0, 1\)"),
        (dict(budget="all"), "int"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(recent_tokens=0), "recent_tokens"),
        (dict(group_reduce="max"), "group_reduce"),
        (dict(tier2_budget=-1), "tier2_budget"),
        (dict(tier2_budget=1.5), "tier2_budget"),
        (dict(tier2_budget=0.0), "tier2_budget"),
        (dict(tier2_budget=True), "tier2_budget"),
        (dict(tier2_budget="half"), "tier2_budget"),
        (dict(spatial_calibration=1), "spatial_calibration"),
        (dict(temporal_calibration="yes"), "temporal_calibration"),
        (dict(selector="oracle", tier2_budget=8), "selector='hash'"),
        (dict(selector="quest", spatial_calibration=True), "selector='hash'"),
    ],
)
def test_bad_values_raise_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DashKVConfig(**kwargs)


def test_budget_in_tokens_and_fraction():
    assert DashKVConfig(budget=100).budget_tokens(10_000) == 100
    assert DashKVConfig(budget=1 / 32).budget_tokens(4096) == 128
    assert DashKVConfig(budget=0.5).budget_tokens(3) == 2  # rounds up
    assert DashKVConfig(budget=10, sink_tokens=4, recent_tokens=6).exact_tokens(1000) == 20


def test_learned_terms_are_off_by_default_and_tier2_counts_like_the_budget():
    config = DashKVConfig()
    assert config.tier2_tokens(4096) == 0 and not config.calibrated and not config.learned_terms
    assert DashKVConfig(tier2_budget=100).tier2_tokens(10_000) == 100
    assert DashKVConfig(tier2_budget=1 / 32).tier2_tokens(4096) == 128
    assert DashKVConfig(budget=10, tier2_budget=50, recent_tokens=6).exact_tokens(1000) == 4 + 6 + 10  # not exact
    assert DashKVConfig(temporal_calibration=True).calibrated and DashKVConfig(tier2_budget=1).learned_terms
    assert DashKVConfig(**DashKVConfig(tier2_budget=0.25, spatial_calibration=True).to_dict()).tier2_budget == 0.25


def test_dense_layers_resolve_negative_and_reject_out_of_range():
    config = DashKVConfig(dense_layers=[0, -1, 1, 0])
    assert config.dense_layers == (0, -1, 1, 0)
    assert config.resolve_dense_layers(30) == (0, 1, 29)
    with pytest.raises(ValueError, match=r"outside this model's 30 layers"):
        DashKVConfig(dense_layers=(30,)).resolve_dense_layers(30)
    with pytest.raises(ValueError, match=r"\[-31\]"):
        DashKVConfig(dense_layers=(-31,)).resolve_dense_layers(30)
