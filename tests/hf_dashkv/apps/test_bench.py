import json

import pytest
import torch

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.apps.bench import (BenchCase, EncoderSpec, _filled_cache, encoder_specs, markdown_table, run,
                                  run_case, step_table)
from hf_dashkv.embedded import shipped_encoders
from hf_dashkv.apps.cli import _tokens, build_parser
from tests.tiny import tiny_model


def test_a_small_case_times_the_attention_call_its_parts_and_the_whole_step():
    spec = EncoderSpec("custom", bits=32, query_hidden=16)
    result = run_case(BenchCase("smollm2", "fp32", 2048, 64, spec), repeats=3, whole_step=True)
    assert result.exact_rows == 4 + 64 + 64
    assert min(result.sdpa_ms, result.hf_default_ms, result.dashkv_ms) > 0
    assert sorted(result.parts_ms) == ["encode", "kernel", "select", "update"] and min(result.parts_ms.values()) > 0
    assert sorted(result.step_ms) == ["dashkv", "full", "full_attention", "hf_default"]
    assert result.step_ms["full"] > result.step_ms["full_attention"]  # the step holds more than the attention
    row = markdown_table([result]).splitlines()[-1]
    assert row.startswith("| custom (32 b, MLP 16) | smollm2 | fp32 | 2k | 64 | 132 |")
    assert step_table([result]).splitlines()[-1].startswith("| custom (32 b, MLP 16) | smollm2 | fp32 | 2k | 64 |")


def test_a_reranked_case_times_the_reranking_path():
    result = run_case(BenchCase("smollm2", "fp32", 2048, 64, EncoderSpec(rerank=2)), repeats=2)
    assert result.exact_rows == 4 + 64 + 64 and result.dashkv_ms > 0  # the budget's rows, however many were scored
    assert result.step_ms is None


def test_named_encoder_configs_are_the_default_and_the_shipped_ones():
    default, shipped, custom = encoder_specs(["default", "shipped", "custom"], EncoderSpec(bits=16))
    assert (default.bits, default.query_hidden, default.rerank) == (
        EncoderConfig().bits, EncoderConfig().query_hidden, DecodePolicy().rerank)
    trained = HashEncoders.from_pretrained(str(shipped_encoders("smollm2-135m")))
    assert (shipped.name, shipped.bits, shipped.query_hidden, shipped.rerank) == (
        "shipped", trained.config.bits, trained.config.query_hidden, (trained.policy or DecodePolicy()).rerank)
    assert custom == EncoderSpec(bits=16)


def test_run_writes_json_markdown_and_plot(tmp_path):
    cases = [BenchCase("smollm2", "bf16", n, 1 / 16) for n in (1024, 2048)]
    run(cases, tmp_path, repeats=3, whole_step=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["context"] for r in data["results"]] == [1024, 2048]
    assert [r["encoders"]["bits"] for r in data["results"]] == [32, 32]
    assert (tmp_path / "results.md").read_text().count("| smollm2 | bf16 |") == 2
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_caches_are_filled_by_tiling_real_kv():
    model = tiny_model("llama-gqa")
    encoders = HashEncoders.random(model.config, EncoderConfig(bits=16, query_hidden=0), dense_layers=(0,))
    kv = [(torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)) for _ in range(4)]
    cache = _filled_cache(DashKVCache(model.config, encoders, DecodePolicy(dense_layers=(0,))), kv, 30)
    assert cache.get_seq_length() == 30
    assert torch.equal(cache.layers[1].keys[:, :, 7:14], kv[1][0])
    assert cache.layers[1].key_codes.shape[2] == 30


def test_bench_arguments():
    assert _tokens("4k") == 4096 and _tokens("1000") == 1000
    args = build_parser().parse_args(["bench", "--contexts", "4k", "128k", "--budgets", "0.03125", "2048"])
    assert args.contexts == [4096, 131072] and args.budgets == [1 / 32, 2048] and args.rerank == 1
    assert args.configs == ["default", "shipped"] and args.whole_step
    assert not build_parser().parse_args(["bench", "--no-whole-step"]).whole_step


@pytest.mark.parametrize("enable_gqa", [False, True], ids=["folded", "enable_gqa"])
def test_the_full_attention_of_the_whole_step_is_transformers_sdpa(enable_gqa):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_dashkv.apps.bench import _Attention, _best_full_attention

    g = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(2, 8, 1, 16, generator=g), *torch.randn(2, 2, 2, 30, 16, generator=g)
    expected, _ = sdpa_attention_forward(_Attention(8, 2), query, key, value, None, scaling=0.3)
    out, _ = _best_full_attention(enable_gqa)(_Attention(8, 2), query, key, value, None, scaling=0.3)
    torch.testing.assert_close(out, expected)


def test_bench_on_cuda_without_a_gpu_says_so(tmp_path):
    from hf_dashkv.apps.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the next test runs the bench on it")
    with pytest.raises(SystemExit, match="no CUDA device here"):
        main(["bench", "--device", "cuda", "--out-dir", str(tmp_path)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_small_case_runs_on_the_gpu_with_the_triton_kernels():
    result = run_case(BenchCase("smollm2", "bf16", 4096, 1 / 32, EncoderSpec(bits=32)), repeats=3, whole_step=True,
                      device="cuda")
    assert min(result.sdpa_ms, result.dashkv_ms, *result.parts_ms.values(), *result.step_ms.values()) > 0
