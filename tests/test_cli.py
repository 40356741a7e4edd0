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
