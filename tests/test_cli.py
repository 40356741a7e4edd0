from dataclasses import replace

import pytest

from hf_dashkv import DashKVConfig
from hf_dashkv.apps.cli import build_parser, decode_config


def generate_args(*argv):
    return build_parser().parse_args(["generate", *argv])


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
    trained = DashKVConfig(bits=64, query_hidden=0, sink_tokens=4, recent_tokens=64, dense_layers=(12, 18))
    # nothing given: the encoders' own policy, at the command's default budget
    assert decode_config(generate_args(), trained) == replace(trained, budget=1 / 32)
    config = decode_config(generate_args("--sink-tokens", "8", "--recent-tokens", "16", "--dense-layers", "0", "12",
                                         "18", "--budget", "128"), trained)
    assert (config.sink_tokens, config.recent_tokens, config.dense_layers, config.budget) == (8, 16, (0, 12, 18), 128)
    assert config.bits == 64
    with pytest.raises(SystemExit, match="--bits 32: the trained encoders are 64-bit"):
        decode_config(generate_args("--bits", "32"), trained)


def test_random_encoders_take_bits_from_the_command_line():
    assert decode_config(generate_args("--bits", "32")).bits == 32
    assert decode_config(generate_args()).bits == 64


def test_ship_leaves_the_lowest_recall_layers_below_the_threshold_dense(tmp_path, monkeypatch, capsys):
    from hf_dashkv import HashEncoders
    from hf_dashkv.apps import release
    from hf_dashkv.apps.cli import main
    from hf_dashkv.hub import export
    from tests.tiny import CONFIGS

    exported = export(HashEncoders.random(CONFIGS["llama-gqa"](), DashKVConfig(bits=16, query_hidden=0)),
                      {"recall": {"0": {"trained": 0.5, "random": 0.4}, "1": {"trained": 0.9, "random": 0.5},
                                  "2": {"trained": 0.7, "random": 0.5}, "3": {"trained": 0.95, "random": 0.6}}},
                      tmp_path / "exported")
    monkeypatch.setattr(release, "ASSETS", tmp_path / "assets")
    assert main(["ship", str(exported), "--max-dense", "3", "--threshold", "0.8", "--rerank", "2"]) == 0
    shipped = HashEncoders.from_pretrained(tmp_path / "assets" / "smollm2-135m")
    # three lowest are 0, 2, 1; layer 1 (0.9) is above the threshold and stays hashed
    assert shipped.layout.hashed_layers == (1, 3) and shipped.config.rerank == 2
    assert "| 2 (dense) | 0.700 | 0.500 |" in capsys.readouterr().out


def test_release_steps_keep_their_options():
    args = build_parser().parse_args(["fit-terms", "--model", "gemma3-270m", "--tokens", "1024", "--write"])
    assert (args.model, args.fit_sequences, args.eval_windows, args.tokens, args.positions, args.write) == (
        "gemma3-270m", 4, 3, 1024, 24, True)
    args = build_parser().parse_args(["ship", "runs/x", "--max-dense", "0"])
    assert (args.exported, args.model, args.max_dense, args.threshold, args.group_reduce, args.rerank) == (
        "runs/x", "smollm2-135m", 0, 0.8, None, None)
