"""ExportEncoders: the end of a training run writes (and optionally pushes) its encoders with ``hf_dashkv.hub``."""

from __future__ import annotations

import lightning as L

from hf_dashkv.hub import adapter_from, export, push


class ExportEncoders(L.Callback):
    """At the end of ``fit`` (rank 0): export the encoders with a model card, and push them if asked.

    Args:
        out_dir: where to write ``config.json``, ``model.safetensors`` and ``README.md``.
        push_to_hub: a Hub repo id to publish to, or ``None``.
    """

    def __init__(self, out_dir: str = "encoders", push_to_hub: str | None = None):
        self.out_dir = out_dir
        self.push_to_hub = push_to_hub

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        facts = {
            "base_model": pl_module.hparams.model,
            "steps": trainer.global_step,
            "data": getattr(trainer.datamodule, "sources", None),
            "recall": getattr(pl_module, "last_recall", None),
            "lora": adapter_from(pl_module.state_dict(), pl_module.hparams),
        }
        folder = export(pl_module.encoders, facts, self.out_dir)
        if self.push_to_hub:
            push(folder, self.push_to_hub)
