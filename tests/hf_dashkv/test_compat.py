import warnings

import torch

from hf_dashkv import with_cache
from hf_dashkv.compat import CACHE_KEYWORD
from tests.tiny import sparse_generation_setup


def test_the_current_keyword_runs_without_warnings_and_the_old_one_still_works():
    model, ids, make_cache = sparse_generation_setup(batch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning for a deprecated keyword fails here
        current = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **with_cache(make_cache()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated from transformers 5.24, removed in 6
        old = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, past_key_values=make_cache())
    assert torch.equal(current, old)
    assert CACHE_KEYWORD in ("cache", "past_key_values")
