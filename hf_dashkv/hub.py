"""Exporting trained encoders: safetensors + config + a model card; optionally published to the Hub.

Reads a ``DashKVDistillation`` training checkpoint as plain tensors (``torch.load(weights_only=True)``), so export
and push need neither Lightning nor the base model (`dashkv export`, `dashkv push`); the training's
``ExportEncoders`` callback (``lightning_modules.export``) calls the same :func:`export` and :func:`push`.
A run with a joint LoRA (``lora_rank > 0``) also exports its adapter in peft's format into ``lora/``, and
:func:`load_with_adapter` applies it to the base model for ``DashKVCache`` + ``generate``.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from .config import EncoderConfig
from .encoders import HashEncoders, split_legacy_config
from .layout import ModelLayout, resolve_layers
from .policy import DecodePolicy

ADAPTER_NAME = "default"  # peft's name for the one adapter
LORA_DIR = "lora"


def require_peft():
    """The ``peft`` package, or an ImportError that says how to get it (only a LoRA needs it)."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "Joint LoRA (lora_rank > 0) needs peft: `pip install peft`, or set lora_rank: 0 to train the encoders "
            "alone."
        ) from error
    return peft


def lora_config(rank: int, alpha: int, targets: list[str]):
    """peft ``LoraConfig`` of the joint LoRA: ``rank`` / ``alpha`` on the modules named ``targets``, no dropout."""
    return require_peft().LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )


def peft_weight_name(lora_key: str) -> str:
    """The name ``PeftModel.save_pretrained`` gives the weight of a ``DashKVDistillation.lora`` entry ``lora_key``:
    dots restored, the adapter name dropped (peft's own rule), e.g. ``...q_proj.lora_A.weight``."""
    return lora_key.replace("/", ".").replace(f".{ADAPTER_NAME}", "")


@dataclass
class Adapter:
    """A trained joint LoRA without its base model: peft's ``LoraConfig`` and the weights under peft's saved names."""

    config: object  # peft.LoraConfig
    weights: dict[str, torch.Tensor]

    def save(self, folder: str | Path) -> None:
        """Write ``folder`` as ``PeftModel.save_pretrained`` does, without needing the base model."""
        folder = Path(folder)
        self.config.save_pretrained(folder)  # adapter_config.json
        safetensors.torch.save_file(self.weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})

    def summary(self) -> dict:
        """What ``training.json`` and the model card record of it."""
        return {"folder": LORA_DIR, "rank": self.config.r, "alpha": self.config.lora_alpha,
                "targets": sorted(self.config.target_modules)}


def adapter_from(state_dict: dict, hparams) -> Adapter | None:
    """The joint LoRA in a DashKVDistillation state dict (its ``lora.*`` entries); ``None`` for a run without one."""
    weights = {peft_weight_name(name[len("lora."):]): tensor.detach().cpu().contiguous()
               for name, tensor in state_dict.items() if name.startswith("lora.")}
    if not weights:
        return None
    config = lora_config(hparams["lora_rank"], hparams["lora_alpha"], hparams["lora_targets"])
    config.base_model_name_or_path, config.inference_mode = hparams["model"], True  # as PeftModel.save_pretrained
    return Adapter(config, weights)


def load_with_adapter(model, folder: str | Path):
    """``model`` (the base model, any attention) with the joint LoRA exported in ``folder/lora`` applied.

    Returns a ``peft.PeftModel``: pass it to ``generate`` with a ``DashKVCache`` as the plain model; its
    ``merge_and_unload()`` folds the adapter into the weights for faster decoding (equal up to rounding).
    """
    path = Path(folder) / LORA_DIR
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no adapter: {folder} was exported from a run without a joint LoRA (lora_rank: 0). "
            "Use the base model as it is."
        )
    return require_peft().PeftModel.from_pretrained(model, path)


def encoders_from_checkpoint(path: str | Path) -> tuple[HashEncoders, dict]:
    """The trained encoders of a DashKVDistillation checkpoint, without loading the base model.

    The facts hold the run's joint LoRA as ``facts["lora"]`` (an :class:`Adapter`, or ``None``), for :func:`export`.
    """
    try:  # tensors and plain containers only: a checkpoint from elsewhere cannot run code when loaded
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, so it is not loaded (that would run "
            f"arbitrary code): {str(error).splitlines()[0]}. Export from a DashKVDistillation checkpoint."
        ) from error
    if "dashkv" not in checkpoint:
        raise ValueError(f"{path} is not a DashKVDistillation checkpoint (it has no 'dashkv' entry).")
    saved = checkpoint["dashkv"]
    if "encoder_config" in saved:
        config, policy = EncoderConfig(**saved["encoder_config"]), DecodePolicy.from_dict(saved["policy"])
    else:  # a checkpoint written before the encoders' shape and the decode policy were split
        config, policy = split_legacy_config(saved["config"], str(path))
    encoders = HashEncoders(ModelLayout(**saved["layout"]), config)
    encoders.policy = policy  # what training selected with: the encoders' recommended policy
    state = {k[len("encoders."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("encoders.")}
    encoders.load_state_dict(state, strict=True)
    facts = {
        "base_model": checkpoint["hyper_parameters"].get("model"),
        "steps": checkpoint.get("global_step"),
        "data": checkpoint.get("datamodule_hyper_parameters", {}).get("sources"),
        "recall": checkpoint["dashkv"].get("recall"),
        "lora": adapter_from(checkpoint["state_dict"], checkpoint["hyper_parameters"]),
    }
    return encoders, facts


def with_dense_layers(encoders: HashEncoders, dense_layers: list[int]) -> HashEncoders:
    """The same encoders without weights for ``dense_layers`` (negative indices count from the end), which then
    always run dense; the recommended policy is kept."""
    dense = set(resolve_layers(dense_layers, encoders.layout.num_layers))
    layout = encoders.layout.hashing_only(tuple(i for i in encoders.layout.hashed_layers if i not in dense))
    kept = HashEncoders(layout, encoders.config)
    kept.policy = encoders.policy
    for layer in layout.hashed_layers:
        kept[layer].load_state_dict(encoders[layer].state_dict())
    return kept


def model_card(encoders: HashEncoders, facts: dict) -> str:
    """A Hub model card: what the encoders are for, how they were trained, and what they measured."""
    layout, config, policy = encoders.layout, encoders.config, encoders.policy or DecodePolicy()
    recall = facts.get("recall") or {}
    rows = "\n".join(
        f"| {layer} | {values['trained']:.3f} | {values['random']:.3f} |"
        for layer, values in sorted(recall.items(), key=lambda item: int(item[0]))  # JSON keys are strings
    )
    table = f"| layer | trained | SimHash |\n|---:|---:|---:|\n{rows}" if rows else "(not measured)"
    lora = facts.get("lora")
    lora_line = (f"- joint LoRA (rank {lora['rank']}, alpha {lora['alpha']}, on {lora['targets']}) in "
                 f"`{lora['folder']}/`, trained so that the model under sparse attention keeps its full-attention "
                 "outputs\n" if lora else "")
    load_adapter = ("from peft import PeftModel  # the encoders were trained with the adapter on: apply it\n"
                    f"model = PeftModel.from_pretrained(model, \"<this repo or folder>\", "
                    f"subfolder=\"{lora['folder']}\")\n" if lora else "")
    return f"""---
library_name: hf_dashkv
tags: [dash-kv, kv-cache, long-context]
---
# DASH-KV hash encoders for {facts.get('base_model')}

Key and query hash encoders for [hf_dashkv](https://arxiv.org/abs/2604.19351)'s `DashKVCache`.

- base model: `{facts.get('base_model')}` ({layout.model_type}, {layout.num_layers} layers, {layout.num_heads} query /
  {layout.num_kv_heads} KV heads, head_dim {layout.head_dim})
- bits: {config.bits}; query encoder hidden width: {config.query_hidden}
- hashed layers: {list(layout.hashed_layers)}; dense layers: {list(layout.dense_layers)}
- recommended decode policy (`decode_policy.json`, `encoders.policy`): {policy.to_dict()}
- training data: {facts.get('data')}; optimizer steps: {facts.get('steps')}
{lora_line}- {facts.get('notes', '')}

R@8|B per hashed layer: the share of each query head's 8 highest-scoring candidate keys (between
{policy.sink_tokens} sinks and a {policy.recent_tokens}-token recent window) inside the budget {policy.budget} that
Hamming distance selects for its KV group, at the last 32 positions of the validation blocks (documents of the
training sources that training never saw); random projections of the same width (SimHash) beside it.

{table}

```python
import hf_dashkv
from hf_dashkv import DashKVCache, HashEncoders
encoders = HashEncoders.from_pretrained("<this repo or folder>")
{load_adapter}cache = DashKVCache(model.config, encoders)  # the recommended policy; or pass a DecodePolicy
```
"""


def export(encoders: HashEncoders, facts: dict, out_dir: str | Path) -> Path:
    """``save_pretrained``, the model card, and ``training.json`` (the facts, recall included); returns the folder.

    ``facts["lora"]``, an :class:`Adapter` if the run had one, is written to ``out_dir/lora`` in peft's format.
    """
    out_dir = Path(out_dir)
    encoders.save_pretrained(out_dir)
    if facts.get("lora") is not None:
        facts["lora"].save(out_dir / LORA_DIR)
        facts = {**facts, "lora": facts["lora"].summary()}
    (out_dir / "README.md").write_text(model_card(encoders, facts))
    (out_dir / "training.json").write_text(json.dumps(facts, indent=1))
    return out_dir


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Publish an exported folder to the Hugging Face Hub; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload DASH-KV hash encoders")
    return str(url)

