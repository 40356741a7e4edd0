"""Shared fixtures: the real SmolLM2 and Gemma-3-270M (slow, loaded once per session)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

if not torch.cuda.is_available():  # CI: the Triton kernels run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, so before hf_dashkv

import pytest  # noqa: E402

import hf_dashkv  # noqa: E402,F401  (registers "dashkv")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct with "dashkv" attention, and its tokenizer."""
    from hf_dashkv.embedded import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_270m():
    """The real Gemma-3-270M (15 sliding + 3 global layers) with "dashkv" attention, and its tokenizer."""
    from hf_dashkv.embedded import load_model

    return load_model("gemma3-270m")
