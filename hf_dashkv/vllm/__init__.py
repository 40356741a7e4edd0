"""DASH-KV in vLLM: a ``vllm.general_plugins`` plugin (``plugin.register``) with a CPU attention backend that decodes
by the library's selection rule over paged hash codes, and :func:`LLM`, vLLM's ``LLM`` with DASH-KV on.

Importing this package (or ``paged``, ``settings``) does not import vLLM; ``backend``, ``model`` and ``plugin``'s
``register`` do. The rest of ``hf_dashkv`` never imports this package.
"""

from .llm import LLM

__all__ = ["LLM"]
