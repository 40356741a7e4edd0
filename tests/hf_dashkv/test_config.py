import pytest

from hf_dashkv import DecodePolicy, EncoderConfig
from hf_dashkv.selectors import OracleSelector, QuestSelector


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=60), r"EncoderConfig\.bits=60.*multiple of 8"),
        (dict(bits=0), r"EncoderConfig\.bits=0.*multiple of 8"),
        (dict(bits=True), r"EncoderConfig\.bits=True"),
        (dict(query_hidden=-1), r"EncoderConfig\.query_hidden=-1"),
    ],
)
def test_bad_encoder_config_values_raise_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**kwargs)


def test_encoder_config_code_bytes():
    assert EncoderConfig(bits=64).code_bytes == 8 and EncoderConfig(bits=32, query_hidden=0).code_bytes == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=0), r"DecodePolicy\.budget=0.*int >= 1"),
        (dict(budget=-3), r"DecodePolicy\.budget=-3.*int >= 1"),
        (dict(budget=1.5), r"DecodePolicy\.budget=1\.5.*\(0, 1\)"),
        (dict(budget=0.0), r"DecodePolicy\.budget=0\.0.*\(0, 1\)"),
        (dict(budget="all"), r"DecodePolicy\.budget='all'.*int"),
        (dict(sink_tokens=-1), r"DecodePolicy\.sink_tokens"),
        (dict(recent_tokens=0), r"DecodePolicy\.recent_tokens"),
        (dict(group_reduce="max"), r"DecodePolicy\.group_reduce"),
        (dict(tier2_budget=-1), r"DecodePolicy\.tier2_budget"),
        (dict(tier2_budget=1.5), r"DecodePolicy\.tier2_budget"),
        (dict(tier2_budget=0.0), r"DecodePolicy\.tier2_budget"),
        (dict(tier2_budget=True), r"DecodePolicy\.tier2_budget"),
        (dict(tier2_budget="half"), r"DecodePolicy\.tier2_budget"),
        (dict(spatial_calibration=1), r"DecodePolicy\.spatial_calibration"),
        (dict(temporal_calibration="yes"), r"DecodePolicy\.temporal_calibration"),
        (dict(rerank=0), r"DecodePolicy\.rerank=0"),
        (dict(rerank=4, tier2_budget=8), r"DecodePolicy\.rerank=4.*rerank=1"),
        (dict(rerank=4, spatial_calibration=True), r"DecodePolicy\.rerank=4.*rerank=1"),
    ],
)
def test_bad_policy_values_raise_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodePolicy(**kwargs)


@pytest.mark.parametrize("policy", [DecodePolicy(tier2_budget=8), DecodePolicy(spatial_calibration=True),
                                    DecodePolicy(rerank=2)])
@pytest.mark.parametrize("selector", [OracleSelector(), QuestSelector()])
def test_a_baseline_selector_refuses_learned_terms_and_reranking(selector, policy):
    with pytest.raises(ValueError, match=r"has no hash codes.*dataclasses\.replace"):
        selector.check(policy)


@pytest.mark.parametrize("page_size", [0, -1, 2.0, True])
def test_quest_refuses_a_bad_page_size(page_size):
    with pytest.raises(ValueError, match=r"QuestSelector\.page_size"):
        QuestSelector(page_size=page_size)


def test_budget_in_tokens_and_fraction():
    assert DecodePolicy(budget=100).budget_tokens(10_000) == 100
    assert DecodePolicy(budget=1 / 32).budget_tokens(4096) == 128
    assert DecodePolicy(budget=0.5).budget_tokens(3) == 2  # rounds up
    exact = DecodePolicy(budget=10, sink_tokens=4, recent_tokens=6)  # 20 exact tokens
    assert OracleSelector().covers(exact, 20) and not OracleSelector().covers(exact, 21)


def test_learned_terms_are_off_by_default_and_tier2_counts_like_the_budget():
    policy = DecodePolicy()
    assert policy.tier2_tokens(4096) == 0 and not policy.calibrated and not policy.learned_terms
    assert DecodePolicy(tier2_budget=100).tier2_tokens(10_000) == 100
    assert DecodePolicy(tier2_budget=1 / 32).tier2_tokens(4096) == 128
    tiered = DecodePolicy(budget=10, tier2_budget=50, recent_tokens=6)  # tier 2 is not exact: 4 + 6 + 10 are
    assert OracleSelector().covers(tiered, 20) and not OracleSelector().covers(tiered, 21)
    assert DecodePolicy(temporal_calibration=True).calibrated and DecodePolicy(tier2_budget=1).learned_terms
    assert DecodePolicy(**DecodePolicy(tier2_budget=0.25, spatial_calibration=True).to_dict()).tier2_budget == 0.25


def test_dense_layers_resolve_negative_and_reject_out_of_range():
    from hf_dashkv.layout import resolve_layers

    policy = DecodePolicy(dense_layers=[0, -1, 1, 0])
    assert policy.dense_layers == (0, -1, 1, 0)
    assert resolve_layers(policy.dense_layers, 30) == (0, 1, 29)
    with pytest.raises(ValueError, match=r"dense_layers has \[30\], outside this model's 30 layers"):
        resolve_layers(DecodePolicy(dense_layers=(30,)).dense_layers, 30)
    with pytest.raises(ValueError, match=r"\[-31\]"):
        resolve_layers(DecodePolicy(dense_layers=(-31,)).dense_layers, 30)


def test_policy_from_dict_refuses_unknown_fields_by_name():
    with pytest.raises(ValueError, match=r"recipe\.json has unknown decode-policy fields \['bits', 'selector'\]"):
        DecodePolicy.from_dict({"budget": 8, "bits": 32, "selector": "hash"}, source="recipe.json")


def test_policy_save_load_round_trip(tmp_path):
    policy = DecodePolicy(budget=1 / 16, sink_tokens=2, recent_tokens=8, dense_layers=[0, -1], group_reduce="min",
                          tier2_budget=32, spatial_calibration=True)
    path = policy.save(tmp_path)
    assert path == tmp_path / "decode_policy.json"
    loaded = DecodePolicy.load(path)
    assert loaded == policy and loaded.dense_layers == (0, -1)
    assert DecodePolicy.from_dict(DecodePolicy(rerank=4).to_dict()) == DecodePolicy(rerank=4)
