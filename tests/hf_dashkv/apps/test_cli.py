import dataclasses
from dataclasses import replace

import pytest

from hf_dashkv import DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.apps.cli import build_parser, decode_policy, describe_policy, main


def generate_args(*argv):
    return build_parser().parse_args(["generate", *argv])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama and the byte tokenizer, saved: what `dashkv generate --model PATH` loads in a second."""
    from tests.tiny import byte_tokenizer, tiny_model

    folder = tmp_path_factory.mktemp("generate") / "model"
    tiny_model("llama-gqa", attn_implementation="sdpa", vocab_size=300).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def trained_encoders(tiny_dir, folder, bits=16):
    """Encoders saved as trained ones are, with a recommended policy (decode_policy.json)."""
    from transformers import AutoConfig

    encoders = HashEncoders.random(AutoConfig.from_pretrained(tiny_dir), EncoderConfig(bits=bits, query_hidden=0),
                                   dense_layers=(0,), seed=1)
    encoders.policy = DecodePolicy(budget=16, sink_tokens=2, recent_tokens=8, group_reduce="min")
    encoders.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("text, value", [("256", 256), ("1/32", 1 / 32), ("0.25", 0.25), ("2048.0", 2048)])
def test_budgets_are_tokens_or_fractions(text, value):
    budget = generate_args("--budget", text).budget
    assert budget == value and type(budget) is type(value)


@pytest.mark.parametrize("text", ["1.5", "0", "-3", "1/0", "half"])
def test_a_budget_that_is_neither_is_refused(text, capsys):
    with pytest.raises(SystemExit):
        generate_args("--budget", text)
    assert "whole number of tokens" in capsys.readouterr().err or text == "half"


def test_trained_encoders_take_the_decode_policy_from_the_command_line():
    trained = DecodePolicy(sink_tokens=4, recent_tokens=64, dense_layers=(12, 18))
    # nothing given: the encoders' own policy, budget included
    assert decode_policy(generate_args(), trained) == trained
    policy = decode_policy(generate_args("--sink-tokens", "8", "--recent-tokens", "16", "--dense-layers", "0", "12",
                                         "18", "--budget", "128", "--rerank", "2"), trained)
    assert (policy.sink_tokens, policy.recent_tokens, policy.dense_layers, policy.budget, policy.rerank) == (
        8, 16, (0, 12, 18), 128, 2)
    assert policy.group_reduce == trained.group_reduce  # what the command line does not set stays the encoders'
    # random encoders: DecodePolicy()'s at 1/32 of the context, with what the command line sets
    assert decode_policy(generate_args()) == replace(DecodePolicy(), budget=1 / 32)
    assert decode_policy(generate_args("--budget", "64")) == replace(DecodePolicy(), budget=64)


def test_generate_refuses_bits_other_than_the_trained_encoders(tiny_dir, tmp_path):
    encoders = trained_encoders(tiny_dir, tmp_path / "encoders", bits=16)
    with pytest.raises(SystemExit, match="--bits 32: the trained encoders are 16-bit"):
        main(["generate", "--model", str(tiny_dir), "--encoders", str(encoders), "--bits", "32"])


def test_random_encoders_take_bits_from_the_command_line(tiny_dir, capsys):
    assert generate_args("--bits", "32").bits == 32 and generate_args().bits is None  # None: 64 for random ones
    args = ["generate", "--model", str(tiny_dir), "--context-tokens", "300", "--max-new-tokens", "2"]
    assert main([*args, "--bits", "32"]) == 0
    assert "UNTRAINED random-projection encoders (SimHash baseline): no trained encoders ship for this model yet, " \
           "32 bits" in capsys.readouterr().out
    assert main(args) == 0
    assert "SimHash baseline): no trained encoders ship for this model yet, 64 bits" in capsys.readouterr().out


def test_describe_policy_names_every_field():
    policy = DecodePolicy(budget=1 / 32, sink_tokens=2, recent_tokens=8, dense_layers=(0, 3), group_reduce="min",
                          rerank=2)
    line = describe_policy(policy)
    for field in dataclasses.fields(DecodePolicy):
        assert f"{field.name} {getattr(policy, field.name)!r}" in line


def test_generate_prints_a_policy_line_naming_every_field(tiny_dir, tmp_path, capsys):
    encoders = trained_encoders(tiny_dir, tmp_path / "encoders")
    assert main(["generate", "--model", str(tiny_dir), "--encoders", str(encoders), "--context-tokens", "300",
                 "--max-new-tokens", "2", "--sink-tokens", "3"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("decode policy")]
    # the encoders' recommended policy (its budget of 16 tokens included), the command's sinks replacing theirs
    expected = DecodePolicy(budget=16, sink_tokens=3, recent_tokens=8, group_reduce="min")
    assert line.startswith("decode policy (the encoders recommend it): " + describe_policy(expected) + "; budget = ")
    for field in dataclasses.fields(DecodePolicy):
        assert f"{field.name} " in line


def test_ship_leaves_the_lowest_recall_layers_below_the_threshold_dense(tmp_path, monkeypatch, capsys):
    from hf_dashkv.apps import release
    from hf_dashkv.hub import export
    from tests.tiny import CONFIGS

    exported = export(HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0)),
                      {"recall": {"0": {"trained": 0.5, "random": 0.4}, "1": {"trained": 0.9, "random": 0.5},
                                  "2": {"trained": 0.7, "random": 0.5}, "3": {"trained": 0.95, "random": 0.6}}},
                      tmp_path / "exported")
    monkeypatch.setattr(release, "ASSETS", tmp_path / "assets")
    assert main(["ship", str(exported), "--max-dense", "3", "--threshold", "0.8", "--rerank", "2"]) == 0
    shipped = HashEncoders.from_pretrained(tmp_path / "assets" / "smollm2-135m")
    # three lowest are 0, 2, 1; layer 1 (0.9) is above the threshold and stays hashed
    assert shipped.layout.hashed_layers == (1, 3) and shipped.policy.rerank == 2
    assert "| 2 (dense) | 0.700 | 0.500 |" in capsys.readouterr().out


def test_release_steps_keep_their_options():
    args = build_parser().parse_args(["fit-terms", "--model", "gemma3-270m", "--tokens", "1024", "--write"])
    assert (args.model, args.fit_sequences, args.eval_windows, args.tokens, args.positions, args.write) == (
        "gemma3-270m", 4, 3, 1024, 24, True)
    args = build_parser().parse_args(["ship", "runs/x", "--max-dense", "0"])
    assert (args.exported, args.model, args.max_dense, args.threshold, args.group_reduce, args.rerank) == (
        "runs/x", "smollm2-135m", 0, 0.8, None, None)
