import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dashkv import kernels
from hf_dashkv.codes import group_distances, nearest, pack_signs

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4]),
    n=st.integers(1, 300), budget=st.integers(1, 64), bits=st.sampled_from([32, 40, 48, 64, 96, 128]),
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
    dist = group_distances(q, k, reduce)
    max_d = bits * (group if reduce == "sum" else 1)
    ref_rows, ref_valid = nearest(dist, cand.unsqueeze(1).expand_as(dist), budget, max_d)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(rows[valid], ref_rows[ref_valid])


def test_supports_cpu_only():
    codes = torch.zeros(1, 1, 4, 8, dtype=torch.uint8)
    assert kernels.supports(codes)
    assert not kernels.supports(codes.to("meta"))


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
    n=st.integers(1, 80), slots=st.integers(1, 40), dim=st.sampled_from([8, 64, 72]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
)
def test_fused_attention_equals_gather_then_sdpa(batch, kv_heads, group, n, slots, dim, dtype, seed):
    from hf_dashkv.attention import attend_rows

    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=g).to(dtype)
    buffer_k = torch.randn(batch, kv_heads, n + 5, dim, generator=g).to(dtype)
    buffer_v = torch.randn(batch, kv_heads, n + 5, dim, generator=g).to(dtype)
    key, value = buffer_k[:, :, :n], buffer_v[:, :, :n]  # views of an over-allocated cache buffer
    rows = torch.randint(0, n, (batch, kv_heads, slots), generator=g)
    row_valid = torch.rand(batch, kv_heads, slots, generator=g) < 0.8
    row_valid[..., 0] = True
    assert kernels.supports_attend(key, value)
    fused = kernels.attend_rows(query, key, value, rows, row_valid, 0.25)
    reference = attend_rows(query.float(), key.float(), value.float(), rows, row_valid, 0.25)
    assert fused.dtype == dtype and fused.shape == (batch, 1, kv_heads * group, dim)
    torch.testing.assert_close(fused.float(), reference, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_fused_attention_is_only_used_where_it_applies():
    x = torch.zeros(1, 1, 4, 8)
    assert kernels.supports_attend(x, x) and kernels.supports_attend(x.bfloat16(), x.bfloat16())
    assert not kernels.supports_attend(x.half(), x.half())
    assert not kernels.supports_attend(x, x.bfloat16())
