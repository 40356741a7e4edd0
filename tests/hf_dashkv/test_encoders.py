import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig

import hf_dashkv
from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.codes import pack_signs
from hf_dashkv.encoders import split_legacy_config
from tests.tiny import CONFIGS, TINY


def test_random_encoders_are_simhash_query_and_key_share_the_projection():
    config = EncoderConfig(bits=32, query_hidden=8)
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), config, dense_layers=(0,), seed=3)
    assert sorted(int(i) for i in enc.layers) == [1, 2, 3]
    layer = enc[1]
    x = torch.randn(5, 16)
    # the same vector as a key of KV head 1 and as a query of its heads 2 and 3 gets the same code
    key_codes = layer.encode_keys(x.view(1, 1, 5, 16).expand(1, 2, 5, 16))[0, 1]  # [5, 4]
    q = x.unsqueeze(1).expand(5, 4, 16)  # every query head sees x
    query_codes = layer.encode_query(q)  # [5, Hkv=2, G=2, 4]
    assert torch.equal(query_codes[:, 1, 0], key_codes) and torch.equal(query_codes[:, 1, 1], key_codes)
    assert torch.equal(key_codes, pack_signs(x @ layer.key.weight[1]))
    again = HashEncoders.random(CONFIGS["llama-gqa"](), config, dense_layers=(0,), seed=3)
    assert torch.equal(again[2].key.weight, enc[2].key.weight)


def test_save_load_round_trip_is_exact(tmp_path):
    config = EncoderConfig(bits=16, query_hidden=8)
    enc = HashEncoders.random(CONFIGS["qwen2-gqa"](), config, dense_layers=(0, -1), seed=1)
    enc[1].query.w3.data.normal_()  # a trained-looking MLP, not just the init
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "decode_policy.json").exists()  # no recommended policy: none written
    loaded = HashEncoders.from_pretrained(tmp_path)
    assert loaded.config == config and loaded.layout == enc.layout and loaded.policy is None
    for name, tensor in enc.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_encoders_for_another_model_are_refused_with_the_mismatch_named():
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0))
    with pytest.raises(ValueError, match=r"num_kv_heads: model has 4, encoders have 2"):
        enc.check_compatible(CONFIGS["llama-mha"]())
    enc.check_compatible(CONFIGS["llama-gqa"]())


def test_layers_the_encoders_lack_run_dense():
    model_config = CONFIGS["llama-gqa"]()
    enc = HashEncoders.random(model_config, EncoderConfig(bits=16, query_hidden=0), dense_layers=(0,))
    enc.check_compatible(model_config)  # not a mismatch: layer 0 simply has no encoders
    cache = DashKVCache(model_config, enc, DecodePolicy(budget=4))
    assert cache.layout.hashed_layers == (1, 2, 3) and cache.layout.dense_layers == (0,)
    assert [layer.sparse for layer in cache.layers] == [False, True, True, True]
    assert cache.layers[0].encoders is None and cache.layers[1].encoders is enc[1]


def test_damaged_checkpoint_does_not_load_silently(tmp_path):
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0))
    enc.save_pretrained(tmp_path)
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del state["layers.2.key.bias"]
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['layers.2.key.bias'\]"):
        HashEncoders.from_pretrained(tmp_path)


def test_truncated_or_non_finite_checkpoints_name_the_file_and_the_fix(tmp_path):
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0))
    enc.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors could not be read .* truncated or damaged"):
        HashEncoders.from_pretrained(tmp_path)
    weights.write_bytes(whole)
    for bad in (float("nan"), float("inf")):
        state = safetensors.torch.load_file(weights)
        state["layers.3.key.weight"][0, 0, 0] = bad
        safetensors.torch.save_file(state, weights)
        with pytest.raises(ValueError, match=r"NaN or infinite values in \['layers.3.key.weight'\].*re-export"):
            HashEncoders.from_pretrained(tmp_path)
    weights.write_bytes(whole)
    assert torch.isinf(HashEncoders.from_pretrained(tmp_path)[1].tier2.weight).any()  # unfitted tier 2 still loads


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0))
    enc.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        HashEncoders.from_pretrained(tmp_path)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="not written by HashEncoders.save_pretrained"):
        HashEncoders.from_pretrained(tmp_path)


def test_query_encoder_is_the_same_map_at_any_batch_shape():
    config = EncoderConfig(bits=16, query_hidden=8)
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), config, seed=2)[1].query
    for w in (enc.w3, enc.b1):
        w.data.normal_()
    q = torch.randn(3, 5, 4, 16)  # [B, T, Hq, D]: training sees many positions
    one_by_one = torch.stack([torch.stack([enc(q[b, t]) for t in range(5)]) for b in range(3)])
    torch.testing.assert_close(enc(q), one_by_one)
    head = 2
    x = torch.nn.functional.silu(q[..., head, :] @ enc.w1[head] + enc.b1[head])
    x = torch.nn.functional.silu(x @ enc.w2[head] + enc.b2[head])
    expected = q[..., head, :] @ enc.proj[head] + x @ enc.w3[head] + enc.b3[head]
    torch.testing.assert_close(enc(q)[..., head, :], expected)


def test_input_scale_divides_the_inputs_and_older_checkpoints_load_neutral(tmp_path):
    config = EncoderConfig(bits=16, query_hidden=8)
    encoders = HashEncoders.random(CONFIGS["llama-gqa"](), config, seed=1)
    layer = encoders[1]
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(1, 2, 5, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    before_k, before_q = layer.key(keys), layer.query(queries)
    layer.key.input_scale.copy_(torch.tensor([2.0, 4.0]))
    layer.query.input_scale.fill_(3.0)
    torch.testing.assert_close(layer.key(keys * torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)), before_k)
    torch.testing.assert_close(layer.query(queries * 3.0), before_q)
    encoders.save_pretrained(tmp_path)
    assert torch.equal(HashEncoders.from_pretrained(tmp_path)[1].key.input_scale, torch.tensor([2.0, 4.0]))
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    safetensors.torch.save_file({n: t for n, t in state.items() if "input_scale" not in n}, tmp_path / "model.safetensors")
    assert HashEncoders.from_pretrained(tmp_path)[1].key.input_scale.eq(1).all()  # written before the scales existed


def test_save_pretrained_writes_the_recommended_policy_and_from_pretrained_reads_it(tmp_path):
    enc = HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0))
    enc.policy = DecodePolicy(budget=1 / 8, sink_tokens=2, recent_tokens=16, dense_layers=(-1,), rerank=3)
    enc.save_pretrained(tmp_path)
    assert DecodePolicy.load(tmp_path / "decode_policy.json") == enc.policy
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["encoder_config"] == {"bits": 16, "query_hidden": 0} and "dashkv_config" not in saved
    loaded = HashEncoders.from_pretrained(tmp_path)
    assert loaded.policy == enc.policy and loaded.config == enc.config
    assert DashKVCache(CONFIGS["llama-gqa"](), loaded).policy == enc.policy  # the cache's default policy


LEGACY_CONFIG = dict(
    bits=16, budget=0.25, sink_tokens=2, recent_tokens=8, dense_layers=[0], query_hidden=0, group_reduce="min",
    selector="hash", page_size=16, tier2_budget=0, spatial_calibration=False, temporal_calibration=False, rerank=2,
)


def test_an_old_folder_with_a_combined_config_loads_split_into_config_and_policy(tmp_path):
    model_config = CONFIGS["llama-gqa"]()
    enc = HashEncoders.random(model_config, EncoderConfig(bits=16, query_hidden=0), dense_layers=(0,), seed=4)
    enc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    legacy = {"dashkv_config": LEGACY_CONFIG, "layout": saved["layout"]}  # as written before the split
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    loaded = HashEncoders.from_pretrained(tmp_path)
    assert loaded.config == EncoderConfig(bits=16, query_hidden=0)
    assert loaded.policy == DecodePolicy(budget=0.25, sink_tokens=2, recent_tokens=8, dense_layers=(0,),
                                         group_reduce="min", rerank=2)
    assert loaded.layout == enc.layout
    for name, tensor in enc.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert split_legacy_config(LEGACY_CONFIG, "old") == (loaded.config, loaded.policy)
    with pytest.raises(ValueError, match=r"names selector 'quest'.*Baselines are selectors now.*selector=QuestSelector"):
        split_legacy_config({**LEGACY_CONFIG, "selector": "quest"}, "old")


SHIPPED = sorted(p.parent for p in (Path(hf_dashkv.__file__).parent / "assets" / "encoders").glob("*/config.json"))
POLICY_FIELDS = ("budget", "sink_tokens", "recent_tokens", "selector", "page_size", "rerank")


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_encoders_keep_the_policy_apart_from_what_training_fixed(folder):
    assert len(SHIPPED) >= 2
    config = json.loads((folder / "config.json").read_text())

    def keys(value):
        if isinstance(value, dict):
            for key, inner in value.items():
                yield key
                yield from keys(inner)

    assert not set(keys(config)) & set(POLICY_FIELDS), f"{folder.name}/config.json holds decode-policy fields"
    assert set(config["encoder_config"]) == {"bits", "query_hidden"}
    assert (folder / "decode_policy.json").is_file()
    DecodePolicy.load(folder / "decode_policy.json")  # a valid policy, no unknown field


def trained_looking(encoders: HashEncoders, seed: int = 0) -> HashEncoders:
    """``encoders`` with every per-head tensor random (biases, input scales, the MLP's last layer, tier-2 terms),
    so that a wrong head slice of any of them changes the codes or the terms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*encoders.named_parameters(), *encoders.named_buffers()]:
            if tensor.dim() and not name.endswith(("key.weight", "query.proj")):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5 if name.endswith("input_scale")
                             else torch.randn(tensor.shape, generator=g))
    return encoders


@pytest.mark.parametrize("heads", [range(6), range(2), range(2, 4), range(3, 6), range(5, 6)])
def test_a_shard_encodes_its_kv_heads_and_their_query_heads_as_the_whole_layer_does(heads):
    model_config = LlamaConfig(**{**TINY, "hidden_size": 192, "num_attention_heads": 12}, num_key_value_heads=6)
    layer = trained_looking(HashEncoders.random(model_config, EncoderConfig(bits=32, query_hidden=8)))[1]
    shard = layer.shard(heads)
    group = 2
    queries = slice(group * heads.start, group * heads.stop)
    keys, query = torch.randn(3, 6, 7, 16), torch.randn(5, 12, 16)
    kv = slice(heads.start, heads.stop)
    assert torch.equal(shard.encode_keys(keys[:, kv]), layer.encode_keys(keys)[:, kv])
    assert torch.equal(shard.encode_query(query[:, queries]), layer.encode_query(query)[:, kv])
    assert torch.equal(shard.tier2.weight, layer.tier2.weight[queries])
    assert torch.equal(shard.calibration.spatial, layer.calibration.spatial)
    assert layer.key.weight.shape[0] == 6 and shard.key.weight.shape[0] == len(heads)  # the layer is unchanged


def test_a_shard_must_be_consecutive_kv_heads_of_the_layer():
    layer = HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0))[0]
    for bad in (range(3), range(1, 1), range(0, 2, 2)):
        with pytest.raises(ValueError, match=r"consecutive KV heads within range\(2\)"):
            layer.shard(bad)
