"""The Triton decode kernels against the PyTorch definition, small shapes: on a GPU where there is one, else under
Triton's interpreter on CPU tensors (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before the kernels are
defined). Their speed needs a GPU (``dashkv bench --device cuda``).
"""

import os

import pytest
import torch

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, triton_kernels
from hf_dashkv.backends import TorchBackend, TritonBackend, choose_backend
from hf_dashkv.codes import head_distances, pack_signs
from hf_dashkv.exact import attend_rows
from hf_dashkv.plans import CodePlan, RerankPlan, ScorePlan
from hf_dashkv.selection import Selection, combine_group, left_padded, select_step
from hf_dashkv.selectors.tiers import TieredPlan
from tests.tiny import assert_decodes_as_replayed, tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_is_installed_and_runs_here():
    # a dependency of the tests (scripts/install.sh): a broken install must fail here, not skip the kernels' tests
    assert triton_kernels.triton is not None, "triton failed to import: reinstall with `bash scripts/install.sh`"
    assert DEVICE == "cuda" or triton_kernels.interpreting()


CASES = {  # (batch, kv heads, group, N, bits, sinks, recent, budget, reduce, left padding, dtype)
    "GQA, fp32": (1, 2, 4, 90, 32, 4, 8, 12, "sum", (0,), torch.float32),
    "GQA, left padding, bf16": (2, 2, 2, 70, 64, 2, 4, 9, "sum", (0, 11), torch.bfloat16),
    "MQA, min over the group, fp16": (1, 1, 4, 64, 16, 1, 5, 7, "min", (0,), torch.float16),
    "MHA, 128 bits, fp16": (2, 3, 1, 50, 128, 4, 6, 5, "sum", (3, 0), torch.float16),
    "budget larger than the candidates": (2, 2, 2, 40, 32, 4, 8, 64, "sum", (0, 9), torch.float32),
    "no candidates at all": (1, 2, 2, 10, 32, 4, 8, 3, "sum", (0,), torch.bfloat16),
}


def case_inputs(batch, kv_heads, group, n, bits, pad, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, 16, generator=g).to(dtype)
    key, value = (torch.randn(batch, kv_heads, n + 5, 16, generator=g).to(dtype)[:, :, :n] for _ in range(2))
    query_codes = pack_signs(torch.randn(batch, kv_heads, group, bits, generator=g))
    # a strided view, as the cache hands over (capacity > length); coarse codes, so there are many ties
    key_codes = pack_signs(torch.randn(batch, kv_heads, n + 3, bits, generator=g).round())[:, :, :n]
    first = torch.tensor(pad[:batch])
    return tuple(t.to(DEVICE) for t in (query, key, value, query_codes, key_codes, first))


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_triton_step_selects_and_attends_as_the_definition(name):
    batch, kv_heads, group, n, bits, sinks, recent, budget, reduce, pad, dtype = CASES[name]
    query, key, value, query_codes, key_codes, first = case_inputs(batch, kv_heads, group, n, bits, pad, dtype)
    out, rows, valid = triton_kernels.decode_attention(query, query_codes, key, value, key_codes, first, sinks,
                                                       recent, budget, reduce, 0.25)
    seen = torch.arange(n, device=DEVICE) >= first.view(-1, 1)
    reference = select_step(combine_group(head_distances(query_codes, key_codes), reduce), sinks, recent, budget, seen)
    assert torch.equal(valid, reference.valid)
    assert torch.equal(rows[valid], reference.rows[reference.valid])
    expected = attend_rows(query, key, value, reference, 0.25)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_padding_anywhere_is_masked_as_the_definition_masks_it():
    # not left padding (a hole mid-sequence): the numba backend refuses it; the Triton one takes it
    query, key, value, query_codes, key_codes, first = case_inputs(2, 2, 2, 60, 32, (0, 4), torch.float32)
    seen = torch.ones(2, 60, dtype=torch.bool, device=DEVICE)
    seen[1, :4] = False
    seen[0, 20:31] = False
    seen[1, 57] = False  # inside the recent window
    out, rows, valid = triton_kernels.decode_attention(query, query_codes, key, value, key_codes, first, 3, 6, 10,
                                                       "sum", 0.25, seen)
    reference = select_step(combine_group(head_distances(query_codes, key_codes), "sum"), 3, 6, 10, seen)
    assert torch.equal(valid, reference.valid)
    assert torch.equal(rows[valid], reference.rows[reference.valid])
    torch.testing.assert_close(out, attend_rows(query, key, value, reference, 0.25))


@pytest.mark.parametrize("backend", [TritonBackend, TorchBackend])
def test_a_decode_step_off_the_cpu_reads_nothing_back_from_the_device(backend, monkeypatch):
    # on meta tensors every read-back (bool(t), t.item(), t.tolist(), int(t), nonzero) raises: a hashed layer's
    # step, from the attention call's DecodeStep through the selector's plan to the output and its Selection, runs on
    # them (the Triton kernels replaced by shape-only stand-ins; they launch with sizes from shapes and keep their
    # counts on the device)
    from hf_dashkv.selectors import hash_selector
    from hf_dashkv.step import DecodeStep

    monkeypatch.setattr(triton_kernels, "select_nearest", lambda codes, *a, **k: (
        torch.empty(*codes.shape[:2], 10, dtype=torch.long, device="meta"),
        torch.empty(*codes.shape[:2], 10, dtype=torch.bool, device="meta")))
    monkeypatch.setattr(triton_kernels, "attend_rows", lambda query, *a: torch.empty_like(query).transpose(1, 2))
    policy = DecodePolicy(budget=10, sink_tokens=3, recent_tokens=6)
    encoders = HashEncoders.random(tiny_model().config, EncoderConfig(bits=32, query_hidden=8))[1].to("meta")
    query, key, value = torch.empty(2, 4, 1, 16, device="meta"), *torch.empty(2, 2, 2, 60, 16, device="meta")
    codes = torch.empty(2, 2, 60, 4, dtype=torch.uint8, device="meta")
    valid = torch.empty(2, 60, dtype=torch.bool, device="meta")
    step = DecodeStep(query, key, value, codes, valid, 0.25, 1)
    plan = hash_selector(policy, encoders).plan(step, policy)
    assert type(plan) is CodePlan
    out, selection = backend().run(plan, step)
    assert out.shape == (2, 1, 4, 16) and selection.rows.shape == (2, 2, 3 + 6 + 10)
    assert out.device.type == selection.rows.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):  # what the numba backend's left-padding check would read back
        left_padded(step.valid, step.first)


def test_attention_reads_only_the_valid_rows():
    query, key, value, *_ = case_inputs(1, 2, 2, 30, 32, (0,), torch.float32)
    rows = torch.tensor([[3, 7, 12, 29], [0, 1, 12, 3]], device=DEVICE).view(1, 2, 4)
    valid = torch.tensor([[True, True, False, True], [True, False, False, False]], device=DEVICE).view(1, 2, 4)
    key[0, :, 12], value[0, :, 12] = float("nan"), float("nan")  # only in unused slots: must not leak in
    out = triton_kernels.attend_rows(query, key, value, rows, valid, 0.5)
    expected = attend_rows(query, key.nan_to_num(), value.nan_to_num(), Selection(rows, valid), 0.5)
    torch.testing.assert_close(out, expected)


@pytest.mark.skipif(DEVICE == "cuda", reason="runs the Triton path on CPU tensors, through the interpreter")
def test_generation_through_the_triton_path_is_the_replayed_definition(monkeypatch):
    calls = []
    fused = triton_kernels.decode_attention
    monkeypatch.setattr(triton_kernels, "decode_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = tiny_model("llama-gqa")
    encoders = HashEncoders.random(model.config, EncoderConfig(bits=32, query_hidden=8), dense_layers=(0,))
    cache = DashKVCache(model.config, encoders, DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4),
                        backend="triton")
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    assert_decodes_as_replayed(model, cache, dict(input_ids=ids, attention_mask=mask), max_new_tokens=3,
                               do_sample=False)
    assert [layer.backend.name for layer in cache.layers if layer.sparse] == ["triton"] * 3
    assert len(calls) == 3 * 2  # hashed layers x decode steps after the prompt's token


def test_without_triton_or_a_gpu_the_backend_refuses_with_the_reason(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "runs on CUDA" in TritonBackend().refusal(CodePlan, cpu, torch.float32)  # CPU outside the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TritonBackend().refusal(CodePlan, cpu, torch.float32) is None
    assert "not torch.int32" in TritonBackend().refusal(CodePlan, cpu, torch.int32)
    monkeypatch.setattr(triton_kernels, "triton", None)
    assert "triton is not installed" in TritonBackend().refusal(CodePlan, cpu, torch.float32)


def test_triton_runs_plain_hash_code_plans_and_auto_gives_the_rest_to_pytorch():
    cuda = torch.device("cuda")  # the choice reads the device's type only: no GPU needed
    for plan_type in (RerankPlan, ScorePlan, TieredPlan):
        assert "plain hash-code plans only" in TritonBackend().refusal(plan_type, cuda, torch.float16)
        assert choose_backend("auto", plan_type, cuda, torch.float16).name == "torch"
    assert choose_backend("auto", CodePlan, cuda, torch.bfloat16).name == "triton"
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this layer: it runs plain hash-code plans only, "
                                         r"not RerankPlan.*backend='auto'"):
        choose_backend("triton", RerankPlan, cuda, torch.float16)


def test_a_cache_that_names_triton_for_reranking_is_refused_at_the_first_store():
    model_config = tiny_model().config
    encoders = HashEncoders.random(model_config, EncoderConfig(bits=32, query_hidden=0))
    cache = DashKVCache(model_config, encoders, DecodePolicy(budget=4, rerank=2), backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this layer: .*not RerankPlan"):
        cache.layers[1].store(torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16))
    auto = DashKVCache(model_config, encoders, DecodePolicy(budget=4, rerank=2))
    auto.layers[1].store(torch.zeros(1, 2, 8, 16, dtype=torch.float16), torch.zeros(1, 2, 8, 16, dtype=torch.float16))
    assert auto.layers[1].backend.name == "torch"  # fp16 on the CPU: numba does not take it, Triton does not rerank


def compile_for_sm90() -> list[str]:
    """Compile each kernel ahead of time for an H100/H200-class GPU (sm_90) with Triton's own compiler, no GPU
    needed; run in a process where ``TRITON_INTERPRET=0`` (the interpreter skips compilation). The kernels address
    slots through a block table: these are the paged kernels, which the contiguous entry points run too; distances
    compile with a padding mask (the contiguous cache) and without (a paged one)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_(kernel, arguments: dict, constants: dict) -> str:
        signature = {**arguments, **{name: "constexpr" for name in constants}}
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
        return f"{kernel.__name__}: {len(compiled.asm['cubin'])} bytes"

    ints = lambda *names: {name: "i32" for name in names}  # noqa: E731
    done = [
        compile_(triton_kernels._distances_kernel,
                 {"q_ptr": "*u8", "k_ptr": "*u8", "table_ptr": "*i32", "lens_ptr": "*i32", "lo_ptr": "*i32",
                  "seen_ptr": "*i8" if seen else "*i32", "out_ptr": "*i32",
                  **ints("recent", "width", "kv_heads", "block_size", "sqr", "sqh", "sqg", "sqc", "skb", "skh", "skn",
                         "skc", "stb", "stw", "ssr")},
                 {"GROUP": 4, "NBYTES": 16, "SUM": True, "HAS_SEEN": seen, "NOT_CANDIDATE": 513, "BLOCK": 128})
        for seen in (True, False)
    ]
    done.append(compile_(
        triton_kernels._select_kernel,
        {"dist_ptr": "*i32", "lens_ptr": "*i32", "budget_ptr": "*i32", "rows_ptr": "*i64", "count_ptr": "*i32",
         **ints("width", "slots", "kv_heads")},
        {"BINS": 1024, "NOT_CANDIDATE": 513, "BLOCK": 128}))
    for dtype in ("*bf16", "*fp16", "*fp32"):
        done.append(compile_(
            triton_kernels._attend_kernel,
            {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "table_ptr": "*i32", "rows_ptr": "*i64",
             "valid_ptr": "*i8", "out_ptr": "*fp32", "scale": "fp32",
             **ints("slots", "kv_heads", "group", "head_dim", "block_size", "sqr", "sqh", "sqg", "sqd", "skb", "skh",
                    "skn", "skd", "svb", "svh", "svn", "svd", "stb", "stw")},
            {"GROUP_P2": 4, "D_P2": 128, "BLOCK_M": 32}))
    return done


def test_the_kernels_compile_for_an_h100_class_gpu_without_one():
    # the interpreter checks what the kernels compute, not that Triton's compiler accepts them: compile them too
    import subprocess
    import sys

    code = "from tests.hf_dashkv.test_triton_kernels import compile_for_sm90; print(*compile_for_sm90(), sep='\\n')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bytes") == 6, done.stdout
