import json

import torch

from hf_dashkv import DashKVCache, DashKVConfig, HashEncoders
from hf_dashkv.apps.bench import BenchCase, _filled_cache, markdown_table, run, run_case
from hf_dashkv.apps.cli import _tokens, build_parser
from tests.tiny import tiny_model


def test_a_small_case_times_all_three_paths():
    result = run_case(BenchCase("smollm2", "fp32", 2048, 64), repeats=3)
    assert result.exact_rows == 4 + 64 + 64
    assert min(result.sdpa_ms, result.hf_default_ms, result.dashkv_ms) > 0
    row = markdown_table([result]).splitlines()[-1]
    assert row.startswith("| smollm2 | fp32 | 2k | 64 | 132 |")


def test_a_reranked_case_times_the_reranking_path():
    result = run_case(BenchCase("smollm2", "fp32", 2048, 64), repeats=2, rerank=2)
    assert result.exact_rows == 4 + 64 + 64 and result.dashkv_ms > 0  # the budget's rows, however many were scored


def test_run_writes_json_markdown_and_plot(tmp_path):
    cases = [BenchCase("smollm2", "bf16", n, 1 / 16) for n in (1024, 2048)]
    results = run(cases, tmp_path, repeats=3)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["context"] for r in data["results"]] == [1024, 2048] and data["meta"]["bits"] == 32
    assert (tmp_path / "results.md").read_text().count("| smollm2 | bf16 |") == 2
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert len(results) == 2


def test_caches_are_filled_by_tiling_real_kv():
    model = tiny_model("llama-gqa")
    config = DashKVConfig(bits=16, query_hidden=0, dense_layers=(0,))
    kv = [(torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)) for _ in range(4)]
    cache = _filled_cache(DashKVCache(model.config, HashEncoders.random(model.config, config), config), kv, 30)
    assert cache.get_seq_length() == 30
    assert torch.equal(cache.layers[1].keys[:, :, 7:14], kv[1][0])
    assert cache.layers[1].key_codes.shape[2] == 30


def test_bench_arguments():
    assert _tokens("4k") == 4096 and _tokens("1000") == 1000
    args = build_parser().parse_args(["bench", "--contexts", "4k", "128k", "--budgets", "0.03125", "2048"])
    assert args.contexts == [4096, 131072] and args.budgets == [1 / 32, 2048] and args.rerank == 1
