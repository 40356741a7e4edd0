import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dashkv.codes import hamming_distance, head_distances, head_distances_many, nearest, pack_signs, unpack_bits

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3)
bit_widths = st.sampled_from([8, 16, 24, 32, 64, 96, 128])


def plain_pack(x: torch.Tensor) -> list[int]:
    """Byte values by the documented layout: bit j of byte i is x[8i + j] > 0."""
    flat = x.reshape(-1, x.shape[-1]).tolist()
    return [sum(1 << j for j in range(8) if row[8 * i + j] > 0) for row in flat for i in range(len(row) // 8)]


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=bit_widths, seed=st.integers(0, 2**16))
def test_pack_matches_plain_layout_and_unpacks(shape, bits, seed):
    x = torch.randn(*shape, bits, generator=torch.Generator().manual_seed(seed))
    codes = pack_signs(x)
    assert codes.dtype == torch.uint8 and codes.shape == (*shape, bits // 8)
    assert codes.flatten().tolist() == plain_pack(x)
    assert torch.equal(unpack_bits(codes), x > 0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 6), bits=bit_widths, seed=st.integers(0, 2**16))
def test_hamming_equals_count_of_differing_signs(n, m, bits, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 1, bits, generator=g), torch.randn(1, m, bits, generator=g)
    expected = ((a > 0) != (b > 0)).sum(-1)
    assert torch.equal(hamming_distance(pack_signs(a), pack_signs(b)), expected.int())


def test_head_distances_many_equals_xor_popcount_per_position():
    g = torch.Generator().manual_seed(0)
    q = pack_signs(torch.randn(2, 3, 5, 4, 64, generator=g))  # B, Hkv, P, G
    k = pack_signs(torch.randn(2, 3, 10, 64, generator=g))
    many = head_distances_many(q, k)
    assert many.shape == (2, 3, 5, 4, 10)
    for p in range(5):
        assert torch.equal(many[:, :, p], head_distances(q[:, :, p], k))


def sort_reference(dist: torch.Tensor, cand: torch.Tensor, k: int) -> list[list[int]]:
    """Smallest distance first, ties to the later position, as documented."""
    out = []
    for d_row, c_row in zip(dist.tolist(), cand.tolist()):
        pool = [(d, -p) for p, (d, c) in enumerate(zip(d_row, c_row)) if c]
        out.append(sorted(-p for _, p in sorted(pool)[:k]))
    return out


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 4), n=st.integers(1, 40), k=st.integers(1, 45),
    max_d=st.integers(0, 8), seed=st.integers(0, 2**16),
)
def test_nearest_equals_a_sort_with_ties_to_the_later_position(rows, n, k, max_d, seed):
    g = torch.Generator().manual_seed(seed)
    dist = torch.randint(0, max_d + 1, (rows, n), generator=g)  # few values: many ties
    cand = torch.rand(rows, n, generator=g) < 0.7
    positions, valid = nearest(dist, cand, k)
    assert positions.shape == valid.shape == (rows, k)
    got = [p[v].tolist() for p, v in zip(positions, valid)]
    assert got == sort_reference(dist, cand, k)
