import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_dashkv.exact import attend_rows, gather_rows
from hf_dashkv.selection import Selection


class Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def qkv(batch=2, heads=6, kv_heads=2, n=20, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, 1, d, generator=g),
        torch.randn(batch, kv_heads, n, d, generator=g),
        torch.randn(batch, kv_heads, n, d, generator=g),
    )


def test_attending_all_rows_equals_full_attention():
    q, k, v = qkv()
    rows = torch.arange(20).expand(2, 2, 20)
    out = attend_rows(q, k, v, Selection(rows, torch.ones(2, 2, 20, dtype=torch.bool)), 0.3)
    ref, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.3)
    assert out.shape == ref.shape == (2, 1, 6, 8)
    torch.testing.assert_close(out, ref)


def test_attending_selected_rows_equals_attention_over_those_rows():
    q, k, v = qkv()
    rows = torch.tensor([[[0, 5, 19, 3], [1, 2, 19, 0]]] * 2)
    row_valid = torch.tensor([[[True, True, True, True], [True, True, True, False]]] * 2)
    out = attend_rows(q, k, v, Selection(rows, row_valid), 0.3)
    for b in range(2):
        for h in range(6):
            kv = h // 3
            sel = rows[b, kv][row_valid[b, kv]]
            weights = torch.softmax(q[b, h, 0] @ k[b, kv, sel].T * 0.3, -1)
            torch.testing.assert_close(out[b, 0, h], weights @ v[b, kv, sel])


def test_gather_rows_reads_views_of_an_overallocated_buffer():
    buffer = torch.randn(2, 3, 50, 4)
    x = buffer[:, :, :20]  # what the cache hands over: the first N rows of a larger buffer
    rows = torch.randint(0, 20, (2, 3, 7))
    expected = torch.stack([torch.stack([x[b, h, rows[b, h]] for h in range(3)]) for b in range(2)])
    assert torch.equal(gather_rows(x, rows), expected)
    assert torch.equal(gather_rows(x.transpose(2, 3).transpose(2, 3).contiguous(), rows), expected)
    assert torch.equal(gather_rows(x.to(torch.bfloat16), rows), expected.to(torch.bfloat16))
