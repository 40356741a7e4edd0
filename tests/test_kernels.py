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
    cand = torch.rand(batch, n, generator=g) < 0.8
    rows, valid = kernels.nearest_codes(q, k, cand, budget, reduce)
    dist = group_distances(q, k, reduce)
    max_d = bits * (group if reduce == "sum" else 1)
    ref_rows, ref_valid = nearest(dist, cand.unsqueeze(1).expand_as(dist), budget, max_d)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(rows[valid], ref_rows[ref_valid])


def test_supports_cpu_only():
    codes = torch.zeros(1, 1, 4, 8, dtype=torch.uint8)
    assert kernels.supports(codes, torch.ones(1, 4, dtype=torch.bool))
    assert not kernels.supports(codes.to("meta"), torch.ones(1, 4, dtype=torch.bool))
