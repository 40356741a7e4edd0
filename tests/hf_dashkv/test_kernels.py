import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, kernels, with_cache
from hf_dashkv.backends import NumbaBackend
from hf_dashkv.codes import head_distances, nearest, pack_signs
from hf_dashkv.plans import CodePlan, RerankPlan, ScorePlan
from hf_dashkv.selection import Selection, combine_group, select_step
from hf_dashkv.selectors import OracleSelector
from hf_dashkv.selectors.tiers import TieredPlan
from tests.tiny import CONFIGS


def test_the_compiled_kernel_is_installed():
    # numba is a declared dependency: a broken install must fail here, not quietly fall back to PyTorch
    assert kernels.numba is not None, "numba failed to import: reinstall with `bash scripts/install.sh`"


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 5, 8]),
    n=st.integers(1, 300), budget=st.integers(1, 64), bits=st.sampled_from([32, 40, 48, 64, 96, 128, 256]),
    reduce=st.sampled_from(["sum", "min"]), seed=st.integers(0, 2**16),
)
def test_kernel_selects_exactly_the_reference_set(batch, kv_heads, group, n, budget, bits, reduce, seed):
    g = torch.Generator().manual_seed(seed)
    q = pack_signs(torch.randn(batch, kv_heads, group, bits, generator=g))
    # a strided view, as the cache hands over (capacity > length)
    k = pack_signs(torch.randn(batch, kv_heads, n + 7, bits, generator=g))[:, :, :n]
    lo = torch.randint(0, n + 2, (batch,), generator=g)
    hi = int(torch.randint(0, n + 1, (1,), generator=g))
    cand = (torch.arange(n) >= lo.unsqueeze(1)) & (torch.arange(n) < hi)
    rows, valid = kernels.nearest_codes(q, k, lo, hi, budget, reduce)
    dist = combine_group(head_distances(q, k), reduce)
    ref_rows, ref_valid = nearest(dist, cand.unsqueeze(1).expand_as(dist), budget)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(rows[valid], ref_rows[ref_valid])


def test_the_numba_backend_runs_on_the_cpu_only():
    assert NumbaBackend().refusal(CodePlan, torch.device("cpu"), torch.float32) is None
    assert "runs on the CPU" in NumbaBackend().refusal(CodePlan, torch.device("meta"), torch.float32)


def decode_case(batch, kv_heads, group, n, dim, bits, recent, dtype, seed):
    """Random inputs of one decode step: query, key, value, query codes, key codes, first positions (left padding
    that keeps the recent window real) and the valid mask; K/V/codes are views of over-allocated buffers, as the
    cache hands them over."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=g).to(dtype)
    key = torch.randn(batch, kv_heads, n + 5, dim, generator=g).to(dtype)[:, :, :n]
    value = torch.randn(batch, kv_heads, n + 5, dim, generator=g).to(dtype)[:, :, :n]
    key_codes = pack_signs(torch.randn(batch, kv_heads, n + 5, bits, generator=g))[:, :, :n]
    query_codes = pack_signs(torch.randn(batch, kv_heads, group, bits, generator=g))
    first = torch.randint(0, n - recent + 1, (batch,), generator=g)
    return query, key, value, query_codes, key_codes, first, torch.arange(n) >= first.unsqueeze(1)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 5]),
    n=st.integers(2, 120), budget=st.integers(1, 40), dim=st.sampled_from([8, 64, 72]),
    bits=st.sampled_from([32, 64, 128]), sinks=st.integers(0, 4), recent=st.integers(1, 8),
    reduce=st.sampled_from(["sum", "min"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fused_decode_equals_select_then_attend_rows(
    batch, kv_heads, group, n, budget, dim, bits, sinks, recent, reduce, dtype, seed
):
    from hf_dashkv.exact import attend_rows

    recent = min(recent, n)
    query, key, value, query_codes, key_codes, first, valid = decode_case(batch, kv_heads, group, n, dim, bits, recent,
                                                                          dtype, seed)

    assert NumbaBackend().refusal(CodePlan, key.device, key.dtype) is None
    out, rows, row_valid = kernels.decode_attention(
        query, query_codes, key, value, key_codes, first, sinks, recent, budget, reduce, 0.25
    )
    ref = select_step(combine_group(head_distances(query_codes, key_codes), reduce), sinks, recent, budget, valid)
    assert torch.equal(row_valid, ref.valid)
    assert torch.equal(rows[row_valid], ref.rows[ref.valid])
    reference = attend_rows(query.float(), key.float(), value.float(), ref, 0.25)
    assert out.dtype == dtype and out.shape == (batch, 1, kv_heads * group, dim)
    torch.testing.assert_close(out.float(), reference, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
    n=st.integers(2, 160), budget=st.integers(1, 24), rerank=st.integers(2, 4), dim=st.sampled_from([8, 64]),
    sinks=st.integers(0, 4), recent=st.integers(1, 8), reduce=st.sampled_from(["sum", "min"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
)
def test_fused_rerank_decode_equals_the_rerank_definition(
    batch, kv_heads, group, n, budget, rerank, dim, sinks, recent, reduce, dtype, seed
):
    from hf_dashkv.exact import attend_rows
    from hf_dashkv.plans import rerank_scores

    recent = min(recent, n)
    query, key, value, query_codes, key_codes, first, valid = decode_case(batch, kv_heads, group, n, dim, 32, recent,
                                                                          dtype, seed)
    policy = DecodePolicy(budget=budget, sink_tokens=sinks, recent_tokens=recent, group_reduce=reduce, rerank=rerank)

    out, rows, row_valid = kernels.decode_attention(
        query, query_codes, key, value, key_codes, first, sinks, recent, budget, reduce, 0.25,
        shortlist=rerank * budget,
    )
    distances = combine_group(head_distances(query_codes, key_codes), reduce).unsqueeze(2)
    scores = rerank_scores(query.float(), key.float(), distances, policy, torch.tensor([n]), valid, 0.25)[:, :, 0]
    ref = select_step(scores, sinks, recent, budget, valid)
    assert torch.equal(row_valid, ref.valid)
    mine, theirs = Selection(rows, row_valid).mask(n), ref.mask(n)
    if not torch.equal(mine, theirs):
        # only a float tie at the budget's edge may go either way (the kernel sums the softmax in another order)
        edge = torch.where(theirs & ref.valid.any(-1, keepdim=True), scores, -float("inf")).amax(-1, keepdim=True)
        differ = mine ^ theirs
        assert ((scores - edge).abs()[differ] < 1e-5).all()
        return
    reference = attend_rows(query.float(), key.float(), value.float(), ref, 0.25)
    torch.testing.assert_close(out.float(), reference, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def backend_at_first_store(dtype=torch.float32, policy=None, fitted=False, **cache_kwargs):
    """The name of the backend a tiny GQA cache's hashed layer 1 chooses when it first stores keys of ``dtype``."""
    model_config = CONFIGS["llama-gqa"]()
    encoders = HashEncoders.random(model_config, EncoderConfig(bits=32, query_hidden=0))
    if fitted:  # tier 2 needs fitted terms
        for layer in encoders.layers.values():
            layer.tier2.weight.fill_(0.5)
    cache = DashKVCache(model_config, encoders, policy or DecodePolicy(budget=4), **cache_kwargs)
    layer = cache.layers[1]
    assert layer.backend is None  # nothing is chosen before the first store
    layer.store(torch.zeros(1, 2, 8, 16, dtype=dtype), torch.zeros(1, 2, 8, 16, dtype=dtype))
    return layer.backend.name


def test_the_fused_decode_is_chosen_once_where_it_applies():
    assert backend_at_first_store(torch.float32) == backend_at_first_store(torch.bfloat16) == "numba"
    assert backend_at_first_store(torch.float16) != "numba"  # the kernel takes fp32 and bf16 only
    assert backend_at_first_store(policy=DecodePolicy(budget=4, rerank=2)) == "numba"  # the kernel re-ranks too
    # plans the kernel does not run: the calibrated distances, tier 2, the baselines
    assert backend_at_first_store(policy=DecodePolicy(budget=4, spatial_calibration=True)) == "torch"
    assert backend_at_first_store(policy=DecodePolicy(budget=4, tier2_budget=4), fitted=True) == "torch"
    assert backend_at_first_store(selector=OracleSelector()) == "torch"
    assert backend_at_first_store(backend="torch") == "torch"
    for plan_type in (ScorePlan, TieredPlan):
        assert "hash-code plans only" in NumbaBackend().refusal(plan_type, torch.device("cpu"), torch.float32)
    assert NumbaBackend().refusal(RerankPlan, torch.device("cpu"), torch.bfloat16) is None


def test_auto_runs_fp16_on_the_cpu_by_the_pytorch_definition(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU machine as users have it (the tests run Triton's interpreter)
    assert backend_at_first_store(torch.float16) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # under the interpreter, Triton takes CPU tensors as it takes CUDA ones
    assert backend_at_first_store(torch.float16) == "triton"


@pytest.mark.parametrize("dtype, cache_kwargs, reason", [
    (torch.float16, dict(), (r"backend='numba' cannot run this layer: it takes fp32 or bf16 keys and values, not "
                             r"torch\.float16.*backend='auto'")),
    (torch.float32, dict(policy=DecodePolicy(budget=4, temporal_calibration=True)),
     r"backend='numba' cannot run this layer: it runs hash-code plans only, not ScorePlan"),
    (torch.float32, dict(selector=OracleSelector()), r"it runs hash-code plans only, not ScorePlan"),
])
def test_naming_the_numba_backend_where_it_cannot_run_is_refused_with_the_reason(dtype, cache_kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        backend_at_first_store(dtype, backend="numba", **cache_kwargs)


def test_an_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"backend='cuda': choose 'auto' or one of \['numba', 'torch', 'triton'\]"):
        backend_at_first_store(backend="cuda")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_propagates_non_finite_rows_as_the_reference_does(bad, dtype):
    from hf_dashkv.exact import attend_rows

    g = torch.Generator().manual_seed(0)
    batch, kv_heads, group, n, dim, bits = 2, 2, 2, 64, 16, 32
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=g).to(dtype)
    key = torch.randn(batch, kv_heads, n, dim, generator=g).to(dtype)
    value = torch.randn(batch, kv_heads, n, dim, generator=g).to(dtype)
    key[0, 0, 62, 3] = bad  # in the recent window: always attended
    value[1, 1, 1, :] = bad  # a sink
    key[1, 0, 20] = bad  # a candidate row (whether it is selected depends on its code)
    key_codes = pack_signs(torch.randn(batch, kv_heads, n, bits, generator=g))
    query_codes = pack_signs(torch.randn(batch, kv_heads, group, bits, generator=g))
    out, rows, row_valid = kernels.decode_attention(
        query, query_codes, key, value, key_codes, torch.zeros(batch, dtype=torch.long), 2, 4, 8, "sum", 0.25
    )
    ref = select_step(combine_group(head_distances(query_codes, key_codes), "sum"), 2, 4, 8, None)
    assert torch.equal(rows[row_valid], ref.rows[ref.valid])
    reference = attend_rows(query.float(), key.float(), value.float(), ref, 0.25)
    assert torch.equal(out.float().isnan(), reference.isnan())
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=1e-2, equal_nan=True)


def _generate(model, ids, make_cache):
    return model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, **with_cache(make_cache()))


def test_two_threads_decoding_at_once_get_what_they_get_one_after_the_other():
    import threading

    from tests.tiny import sparse_generation_setup

    model, ids, make_cache = sparse_generation_setup()
    expected = [_generate(model, ids[i : i + 1], make_cache) for i in range(2)]
    results = [[], []]

    def run(i):
        for _ in range(3):
            results[i].append(_generate(model, ids[i : i + 1], make_cache))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(len(r) == 3 and all(torch.equal(x, e) for x in r) for r, e in zip(results, expected))
    # GNU OpenMP would abort a forked process (next test); TBB is installed with the package
    assert kernels.numba.threading_layer() == "tbb"


def test_a_process_forked_after_the_kernel_ran_can_decode():
    import multiprocessing

    from tests.tiny import sparse_generation_setup

    model, ids, make_cache = sparse_generation_setup()
    expected = _generate(model, ids[:1], make_cache)  # numba's thread pool starts here
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def in_child():
        torch.set_num_threads(1)  # PyTorch's own OpenMP pool hangs in a forked child otherwise (as DataLoader does)
        results.put(_generate(model, ids[:1], make_cache).tolist())

    child = context.Process(target=in_child)
    child.start()
    forked = results.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0 and forked == expected.tolist()


@pytest.mark.parametrize("policy", [
    DecodePolicy(budget=5, sink_tokens=2, recent_tokens=4),
    DecodePolicy(budget=0.25, sink_tokens=1, recent_tokens=3),  # each request its own budget
    DecodePolicy(budget=4, sink_tokens=2, recent_tokens=4, group_reduce="min"),
    DecodePolicy(budget=3, sink_tokens=2, recent_tokens=4, rerank=3),
], ids=["fixed budget", "fractional budget", "min over the group", "rerank"])
@pytest.mark.parametrize("layout", ["plain", "vllm cpu", "dashkv layer"])
def test_paged_kernel_equals_the_paged_reference(policy, layout):
    # shuffled blocks with NaN in the unused ones, partial last blocks, three requests sharing two prefix blocks
    from hf_dashkv.vllm.paged import PagedLayer, cpu_kv_views, dashkv_kv_views
    from tests.paged_cases import DIM, contiguous, paged, run_paged, share_prefix

    requests = contiguous([26, 45, 19, 38], seed=3)
    share_prefix(requests, 1, 3, 16)
    layer, table, seq_lens = paged(requests, shared=[(1, 3, 2)], seed=3)
    if layout == "vllm cpu":  # keys transposed per block, in one tensor with the values: copied for the kernel
        physical = torch.cat([layer.key.transpose(-1, -2).flatten(2), layer.value.flatten(2)], dim=-1)
        layer = PagedLayer(*cpu_kv_views(physical.view(*layer.key.shape[:3], 2 * DIM)), layer.key_codes)
    if layout == "dashkv layer":  # each block's keys then values, row-major, in one tensor: read in place
        physical = torch.cat([layer.key.flatten(2), layer.value.flatten(2)], dim=-1)
        layer = PagedLayer(*dashkv_kv_views(physical.view(*layer.key.shape[:3], 2 * DIM)), layer.key_codes)
        (keys, _), (values, _) = kernels._kv_rows(layer.key, layer.value)
        assert np.shares_memory(keys, physical.numpy()) and np.shares_memory(values, physical.numpy())
    ref_out, selections = run_paged(requests, layer, table, seq_lens, policy)
    budgets = torch.tensor([policy.budget_tokens(int(n)) for n in seq_lens])
    steps = kernels.PagedBatch.paged(table, layer.block_size, seq_lens, policy.sink_tokens, policy.recent_tokens,
                                     budgets, policy.rerank)
    out, rows, valid = kernels.paged_decode_attention(
        torch.cat([r[3] for r in requests]), torch.cat([r[4] for r in requests]), layer.key, layer.value,
        layer.key_codes, steps, policy.group_reduce, 0.25)
    torch.testing.assert_close(out, ref_out)
    for r, selection in enumerate(selections):
        width = selection.rows.shape[-1]
        assert not valid[r, :, width:].any()  # a smaller budget than the batch's largest: the rest unused
        assert torch.equal(valid[r, :, :width], selection.valid[0])
        assert torch.equal(rows[r, :, :width][valid[r, :, :width]], selection.rows[0][selection.valid[0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dashkv layer", "contiguous"])
def test_paged_store_equals_the_pytorch_store(dtype, layout):
    from hf_dashkv.vllm.paged import dashkv_kv_views, store_at_slots

    g = torch.Generator().manual_seed(0)
    blocks, heads, block_size, dim, bits, tokens = 6, 2, 4, 8, 24, 7
    qkv = torch.randn(tokens, 5 * heads * dim, generator=g).to(dtype)  # keys and values are strided views, as in vLLM
    key = qkv[:, heads * dim:2 * heads * dim].view(tokens, heads, dim)
    value = qkv[:, -heads * dim:].view(tokens, heads, dim)
    projections = torch.randn(heads, tokens, bits, generator=g)
    projections[0, 0, :3] = 0.0  # zero is not positive: no bit
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
    slots[2] = -1  # padding: not written

    def caches():
        if layout == "dashkv layer":
            key_cache, value_cache = dashkv_kv_views(torch.full((blocks, heads, block_size, 2 * dim), 7.0, dtype=dtype))
        else:
            key_cache, value_cache = (torch.full((blocks, heads, block_size, dim), 7.0, dtype=dtype) for _ in range(2))
        return key_cache, value_cache, torch.full((blocks, heads, block_size, bits // 8), 9, dtype=torch.uint8)

    expected, got = caches(), caches()
    store_at_slots(slots, key, value, projections, *expected)
    kernels.store_paged(slots, key, value, projections, *got)
    for want, have in zip(expected, got):
        assert torch.equal(have, want)
    block, offset = divmod(int(slots[0]), block_size)  # written, not left as filled (both stores a no-op would pass)
    assert torch.equal(got[0][block, :, offset], key[0]) and torch.equal(got[1][block, :, offset], value[0])
    assert torch.equal(got[2][block, :, offset], pack_signs(projections[:, 0]))
    untouched = torch.ones(blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (got[2].transpose(1, 2).flatten(0, 1)[untouched] == 9).all()


def test_paged_store_refuses_a_layout_it_would_write_into_a_copy():
    from hf_dashkv.vllm.paged import cpu_kv_views

    key_cache, value_cache = cpu_kv_views(torch.zeros(2, 1, 4, 16))  # vLLM's layout: keys transposed per block
    with pytest.raises(ValueError, match="in place"):
        kernels.store_paged(torch.tensor([0]), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8),
                            key_cache, value_cache, torch.zeros(2, 1, 4, 1, dtype=torch.uint8))
