"""The keyword under which transformers takes a cache: ``cache=`` from 5.24 on, ``past_key_values=`` before.

transformers 5.24 renamed ``past_key_values=`` to ``cache=`` in ``generate`` and the models' ``forward`` (the old
name still works there, with a FutureWarning on every call, until 6.0); 5.23 and earlier know only
``past_key_values=``. Everything in this package passes caches through :func:`with_cache`, so it runs warning-free
on every supported version (transformers >= 5.0, < 6).
"""

from __future__ import annotations

import transformers
from packaging.version import Version

# by version: generate's signature hides the keyword behind **kwargs and a deprecation decorator
CACHE_KEYWORD = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def with_cache(cache) -> dict:
    """``{CACHE_KEYWORD: cache}``: ``model.generate(**inputs, **with_cache(cache))``, or ``model(ids, **with_cache(c))``."""
    return {CACHE_KEYWORD: cache}
