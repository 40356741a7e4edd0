import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_dashkv.attention import dashkv_attention_forward, key_validity
from tests.test_exact import Module, qkv


def test_key_validity_reads_bool_and_additive_masks():
    k = torch.zeros(2, 1, 4, 8)
    bool_mask = torch.tensor([[[[False, True, True, True]]], [[[True, True, True, True]]]])
    assert torch.equal(key_validity(bool_mask, k), bool_mask[:, 0, 0])
    additive = torch.zeros(2, 1, 1, 4).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(key_validity(additive, k), bool_mask[:, 0, 0])
    assert key_validity(None, k) is None


def test_without_a_dashkv_cache_it_is_plain_sdpa():
    q, k, v = qkv()
    out, _ = dashkv_attention_forward(Module(), q, k, v, None, scaling=0.3)
    ref, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.3)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("term", ["s_aux", "position_bias"])
def test_attention_with_extra_logit_terms_is_refused(term):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"adds terms to the logits \({term}\).*Supported: decoder-only"):
        dashkv_attention_forward(Module(), q, k, v, None, **{term: torch.zeros(q.shape[1])})
