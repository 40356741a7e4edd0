import torch

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.recall import attention_probs, attention_recall, ranking_recall, selected_mass
from hf_dashkv.selection import Selection
from tests.tiny import tiny_model


def mass_of(q, k, rows, ok, scale):
    chosen = Selection(rows, ok).mask(k.shape[2]).unsqueeze(2)  # [B, Hkv, 1, N]
    return selected_mass(attention_probs(q, k, scale), chosen)[..., 0].flatten(1)  # [B, Hq]


def test_selected_mass_is_the_softmax_share_of_the_rows():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    every = torch.arange(10).expand(1, 2, 10)
    assert torch.allclose(mass_of(q, k, every, torch.ones(1, 2, 10, dtype=torch.bool), 0.5), torch.ones(1, 4))
    rows = torch.tensor([[[0, 3, 0], [9, 9, 9]]])
    ok = torch.tensor([[[True, True, False], [True, False, False]]])  # padded slots point at rows too
    mass = mass_of(q, k, rows, ok, 0.5)
    probs = torch.softmax(torch.einsum("hd,knd->hkn", q[0, :, 0], k[0]) * 0.5, -1)  # [Hq, Hkv, N]
    assert torch.allclose(mass[0], torch.stack([probs[0, 0, [0, 3]].sum(), probs[1, 0, [0, 3]].sum(), probs[2, 1, 9], probs[3, 1, 9]]))


def test_recall_grows_with_the_budget_and_leaves_the_model_as_it_was():
    model = tiny_model("llama-gqa")
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(0))
    recalls = []
    for budget in (4, 32):
        policy = DecodePolicy(budget=budget, sink_tokens=2, recent_tokens=4, dense_layers=(0,))
        encoders = HashEncoders.random(model.config, EncoderConfig(bits=32, query_hidden=0), policy.dense_layers)
        cache = DashKVCache(model.config, encoders, policy)
        recalls.append(attention_recall(model, ids, cache, decode_steps=3))
    assert sorted(recalls[0]) == [1, 2, 3]
    for layer, small in recalls[0].items():
        assert 0 < small <= recalls[1][layer] <= 1 + 1e-6
    assert model.config._attn_implementation == "dashkv"


def test_ranking_recall_counts_the_true_top_keys_among_the_candidates_only():
    # one KV head, two query heads, 12 keys; the query at position 11 sees candidates 2..8 (2 sinks, 3 recent)
    g = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 1, 12, 8, generator=g)
    positions = torch.tensor([11])
    allowed = (torch.arange(12) >= 2) & (torch.arange(12) < 9)
    logits = torch.einsum("hd,nd->hn", query[0, :, 0], key[0, 0])
    order = [[int(i) for i in logits[h].argsort(descending=True) if allowed[i]] for h in range(2)]
    chosen = torch.zeros(1, 1, 1, 12, dtype=torch.bool)
    chosen[0, 0, 0, [order[0][0], order[0][1], 0, 11]] = True  # head 0's two best candidates, a sink, the current
    out = ranking_recall(query, key, chosen, allowed.view(1, 1, 12), positions, 0.5, ks=(1, 2, 4))
    assert out["R@1"][0, 0, 0].item() == 1.0 and out["R@2"][0, 0, 0].item() == 1.0 and out["R@4"][0, 0, 0] == 0.5
    expected_r1 = float(order[1][0] in order[0][:2])
    assert out["R@1"][0, 0, 1].item() == expected_r1
    probs = torch.softmax(logits * 0.5, -1)  # the full causal softmax: sinks and the recent window count in it
    torch.testing.assert_close(out["mass"][0, 0, :, 0], probs[:, order[0][:2]].sum(-1))  # but not as selections
