import torch

from hf_dashkv import DecodePolicy, kernels
from hf_dashkv.codes import hamming_distance, head_distances, pack_signs
from hf_dashkv.selection import combine_group, select, select_step


def group_distances(q, k, reduce="sum"):
    return combine_group(head_distances(q, k), reduce)


def select_rows(distances, valid, policy):
    budget = policy.budget_tokens(distances.shape[-1])
    selection = select_step(distances, policy.sink_tokens, policy.recent_tokens, budget, valid)
    return selection.rows, selection.valid


def random_codes(batch=2, kv_heads=3, group=2, n=50, bits=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = pack_signs(torch.randn(batch, kv_heads, group, bits, generator=g))
    k = pack_signs(torch.randn(batch, kv_heads, n, bits, generator=g))
    return q, k


def test_selection_holds_sinks_recent_and_budget_and_skips_padding():
    q, k = random_codes()
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    policy = DecodePolicy(budget=10, sink_tokens=3, recent_tokens=5)
    rows, ok = select_rows(group_distances(q, k), valid, policy)
    assert rows.shape == ok.shape == (2, 3, 18)
    for b, first in ((0, 0), (1, 7)):
        for h in range(3):
            chosen = rows[b, h][ok[b, h]].tolist()
            assert len(chosen) == len(set(chosen)) == 18
            assert set(range(first, first + 3)) <= set(chosen)  # sinks: first real tokens
            assert set(range(45, 50)) <= set(chosen)  # recent window, current token included
            assert all(valid[b, p] for p in chosen)


def test_selection_picks_the_nearest_codes():
    q, k = random_codes(batch=1, kv_heads=1, group=1, n=40, bits=64)
    k[0, 0, 20] = q[0, 0, 0]  # an exact match in the middle
    policy = DecodePolicy(budget=1, sink_tokens=1, recent_tokens=1)
    rows, ok = select_rows(group_distances(q, k), torch.ones(1, 40, dtype=torch.bool), policy)
    assert rows[0, 0].tolist() == [0, 39, 20] and ok.all()


def test_overlapping_sinks_and_recent_are_not_counted_twice():
    q, k = random_codes(batch=1, n=12)
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, :9] = False  # only 3 real tokens: sinks fall inside the recent window
    rows, ok = select_rows(group_distances(q, k), valid, DecodePolicy(budget=2, sink_tokens=2, recent_tokens=3))
    for h in range(3):
        assert sorted(rows[0, h][ok[0, h]].tolist()) == [9, 10, 11]


def test_holes_in_the_mask_are_respected():
    q, k = random_codes(batch=2, n=60, bits=64)
    policy = DecodePolicy(budget=9, sink_tokens=2, recent_tokens=3)
    holes = torch.ones(2, 60, dtype=torch.bool)
    holes[1, :11] = False
    holes[0, 20:40] = False  # not left padding
    rows, ok = select_rows(group_distances(q, k), holes, policy)
    assert not any(20 <= p < 40 for p in rows[0][ok[0]].tolist())
    assert ok[0].sum(-1).eq(14).all()
    assert not any(p < 11 for p in rows[1][ok[1]].tolist())


def test_the_kernels_nearest_codes_is_the_reference_selection():
    q, k = random_codes(batch=2, n=60, bits=64)
    padded = torch.ones(2, 60, dtype=torch.bool)
    padded[1, :11] = False
    policy = DecodePolicy(budget=9, sink_tokens=2, recent_tokens=3)
    rows, ok = select_rows(group_distances(q, k), padded, policy)
    lo = torch.tensor([2, 13])
    fast_rows, fast_ok = kernels.nearest_codes(q, k, lo, 57, 9, "sum")
    assert torch.equal(fast_ok, ok[..., 5:]) and torch.equal(fast_rows[fast_ok], rows[..., 5:][ok[..., 5:]])


def test_combine_group_sum_and_min():
    g = torch.Generator().manual_seed(0)
    q = pack_signs(torch.randn(2, 3, 4, 64, generator=g))  # B, Hkv, G
    k = pack_signs(torch.randn(2, 3, 10, 64, generator=g))
    per_head = torch.stack([hamming_distance(q[:, :, i : i + 1], k) for i in range(4)], dim=2)  # B, Hkv, G, N
    assert torch.equal(group_distances(q, k, "sum"), per_head.sum(2).int())
    assert torch.equal(group_distances(q, k, "min"), per_head.amin(2))


def test_many_positions_at_once_equal_one_decode_step_each():
    """Training and measurement select for many positions in one call: each equals a decode step over its prefix."""
    g = torch.Generator().manual_seed(3)
    n = 60
    scores = torch.randint(0, 40, (2, 3, n, n), generator=g, dtype=torch.int32)  # [B, Hkv, P, N], P = every position
    policy = DecodePolicy(budget=0.125, sink_tokens=2, recent_tokens=4)  # a budget that grows with p
    positions = torch.tensor([5, 17, 30, 59])
    many = select(scores[:, :, positions], policy, positions + 1)
    for i, p in enumerate(positions.tolist()):
        one = select_step(scores[:, :, p, : p + 1], policy.sink_tokens, policy.recent_tokens, policy.budget_tokens(p + 1))
        assert torch.equal(many.mask(n)[:, :, i, : p + 1], one.mask(p + 1))
        assert not many.mask(n)[:, :, i, p + 1 :].any()  # causal
