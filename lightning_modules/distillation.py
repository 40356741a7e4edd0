"""DashKVDistillation: train DASH-KV hash encoders by list-wise attention distillation (arXiv 2604.19351, §3.3).

The base model stays frozen and its outputs unchanged. One forward pass with the "dashkv-capture" attention
records every layer's post-RoPE queries and keys (the vectors attention scores use). For a sample of query
positions, the teacher is the model's own softmax attention over the hashing candidates (the causal keys
between the sinks and the recent window, which are always attended anyway); the student is a softmax over
the relaxed hash similarity ``tanh(beta * code_q) . tanh(beta * code_k) / bits`` times a learned temperature.
Loss = KL(teacher || student) + 0.1 bit balance + 0.1 quantization, with beta annealed from 1 to 10.

Memory is one layer's ``[B, H, positions, T]`` block at a time, never ``T x T``.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_dashkv import DashKVConfig, HashEncoders
from hf_dashkv.codes import nearest
from hf_dashkv.models import load_model

CAPTURE_IMPLEMENTATION = "dashkv-capture"
_captured: dict[int, tuple[torch.Tensor, torch.Tensor, float]] | None = None
_capture_until: int = -1


class _CaptureDone(Exception):
    """Raised after the last layer that is needed: the rest of the forward pass (and the LM head) is skipped."""


def _capture_attention_forward(module, query, key, value, attention_mask, **kwargs):
    if _captured is not None:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5  # the model's own (e.g. Gemma's query scalar)
        _captured[module.layer_idx] = (query.detach(), key.detach(), scaling)
        if module.layer_idx == _capture_until:
            raise _CaptureDone
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention_forward)


class DashKVDistillation(L.LightningModule):
    """Hash encoders for a frozen causal LM, trained to rank keys as the model's own attention does.

    Args:
        model: an embedded model name (``smollm2-135m``) or a transformers path / Hub id.
        bits: code length. query_hidden: query MLP width (0: linear). dense_layers: layers left dense and
            untrained (negative indices count from the end); training every layer shows which to make dense.
        budget, sink_tokens, recent_tokens: the selection that recall is measured at (as at inference).
        query_positions: query positions sampled per sequence per step.
        lr: AdamW learning rate. beta_start, beta_end: the ``tanh`` relaxation, annealed linearly.
        balance_weight, quantization_weight: weights of the bit-balance and quantization terms.
        init_seed: seed of the random projections the encoders start from (SimHash).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        bits: int = 64,
        query_hidden: int = 0,
        dense_layers: list[int] | None = None,
        budget: float = 1 / 32,
        sink_tokens: int = 4,
        recent_tokens: int = 64,
        query_positions: int = 64,
        lr: float = 3e-3,
        beta_start: float = 1.0,
        beta_end: float = 10.0,
        balance_weight: float = 0.1,
        quantization_weight: float = 0.1,
        init_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = DashKVConfig(
            bits=bits, budget=budget, sink_tokens=sink_tokens, recent_tokens=recent_tokens,
            dense_layers=tuple(dense_layers or ()), query_hidden=query_hidden,
        )
        base, self.tokenizer = load_model(model, attn_implementation=CAPTURE_IMPLEMENTATION)
        base.requires_grad_(False)
        self.__dict__["base"] = base  # not a submodule: frozen, never saved in checkpoints, never wrapped by DDP
        self.encoders = HashEncoders.random(base.config, self.config, seed=init_seed)
        self.random_encoders = HashEncoders.random(base.config, self.config, seed=init_seed)
        self.random_encoders.requires_grad_(False)
        self.hashed_layers = list(self.encoders.layout.hashed_layers)
        # student logits = temperature * similarity in [-1, 1]; start near the spread of attention logits
        self.log_temperature = nn.Parameter(torch.full((len(self.hashed_layers),), math.log(10.0)))

    @property
    def beta(self) -> float:
        """The relaxation sharpness for the current step, annealed linearly over ``max_steps``."""
        total = max(1, self.trainer.max_steps) if self._trainer is not None and self.trainer.max_steps > 0 else 1
        progress = min(1.0, self.global_step / total)
        return self.hparams.beta_start + (self.hparams.beta_end - self.hparams.beta_start) * progress

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
        """``(query [B, Hq, T, D], key [B, Hkv, T, D], scaling)`` of every layer, post-RoPE, from one frozen pass."""
        global _captured, _capture_until
        self.base.to(input_ids.device)
        _captured, _capture_until = {}, max(self.hashed_layers)
        try:
            self.base(input_ids=input_ids, use_cache=False)
        except _CaptureDone:
            pass
        try:
            return _captured
        finally:
            _captured = None

    def sample_positions(self, length: int, step: int) -> torch.Tensor:
        """``query_positions`` distinct positions with candidates before them, the same on every rank for a step."""
        low = self.config.sink_tokens + self.config.recent_tokens + 1
        if length <= low:
            raise ValueError(f"seq_len {length} leaves no hashing candidates: use more than {low} tokens.")
        generator = torch.Generator().manual_seed(self.hparams.init_seed * 1_000_003 + step)
        count = min(self.hparams.query_positions, length - low)
        return (low + torch.randperm(length - low, generator=generator)[:count]).sort().values

    def candidate_mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """bool ``[P, T]``: keys between the sinks and the recent window of each query position."""
        keys = torch.arange(length, device=positions.device)
        return (keys >= self.config.sink_tokens) & (keys <= positions.unsqueeze(1) - self.config.recent_tokens)

    def layer_losses(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float, positions) -> dict:
        """KL, bit balance and quantization of one layer for the sampled query positions."""
        encoders = self.encoders[layer]
        beta = self.beta
        length, group = key.shape[2], query.shape[1] // key.shape[1]
        q = query[:, :, positions].float()  # [B, Hq, P, D]
        candidates = self.candidate_mask(positions, length)  # [P, T]
        keys_per_head = key.float().repeat_interleave(group, dim=1)  # [B, Hq, T, D]
        teacher = (q @ keys_per_head.transpose(-1, -2) * scale).masked_fill(~candidates, float("-inf")).softmax(-1)
        q_code = torch.tanh(beta * encoders.query(q.transpose(1, 2)))  # [B, P, Hq, bits]
        k_code = torch.tanh(beta * encoders.key(key.float()))  # [B, Hkv, T, bits]
        similarity = q_code.transpose(1, 2) @ k_code.repeat_interleave(group, dim=1).transpose(-1, -2) / self.config.bits
        temperature = self.log_temperature[self.hashed_layers.index(layer)].exp()
        student = (temperature * similarity).masked_fill(~candidates, float("-inf")).log_softmax(-1)
        kl = torch.where(teacher > 0, teacher * (teacher.clamp_min(1e-12).log() - student), 0.0).sum(-1).mean()
        balance = k_code.mean(2).pow(2).mean() + q_code.mean(1).pow(2).mean()
        quantization = (k_code.abs() - 1).pow(2).mean() + (q_code.abs() - 1).pow(2).mean()
        return dict(kl=kl, balance=balance, quantization=quantization)

    @torch.no_grad()
    def layer_recall(self, encoders: HashEncoders, layer: int, query, key, scale, positions) -> torch.Tensor:
        """Share of the teacher's full attention mass inside sinks + recent + the budget nearest (hard codes).

        As at inference: one selection per KV head from the summed Hamming distances of its query heads; the
        budget is taken at the sequence length.
        """
        cfg, layer_enc = self.config, encoders[layer]
        length, kv_heads = key.shape[2], key.shape[1]
        group = query.shape[1] // kv_heads
        q = query[:, :, positions].float()
        full = q @ key.float().repeat_interleave(group, dim=1).transpose(-1, -2) * scale
        keys = torch.arange(length, device=q.device)
        full = full.masked_fill(keys > positions.unsqueeze(1), float("-inf")).softmax(-1)  # [B, Hq, P, T]
        q_bits = layer_enc.query(q.transpose(1, 2)).gt(0).transpose(1, 2).float()  # [B, Hq, P, bits]
        k_bits = layer_enc.key(key.float()).gt(0).float()  # [B, Hkv, T, bits]
        same = q_bits @ k_bits.repeat_interleave(group, 1).transpose(-1, -2) + (1 - q_bits) @ (
            1 - k_bits.repeat_interleave(group, 1)
        ).transpose(-1, -2)
        distance = (cfg.bits - same).unflatten(1, (kv_heads, group)).sum(2).long()  # [B, Hkv, P, T]
        candidates = self.candidate_mask(positions, length).expand_as(distance)
        rows, ok = nearest(distance, candidates, cfg.budget_tokens(length))
        chosen = torch.zeros_like(distance, dtype=full.dtype).scatter_add_(-1, rows, ok.to(full.dtype)).clamp(max=1)
        always = (keys < cfg.sink_tokens) | (keys > positions.unsqueeze(1) - cfg.recent_tokens)
        chosen = torch.maximum(chosen, always.to(chosen.dtype)).repeat_interleave(group, 1)
        return (full * chosen).sum(-1).mean()

    def _step(self, batch, stage: str) -> torch.Tensor:
        input_ids = batch["input_ids"]
        captured = self.capture(input_ids)
        positions = self.sample_positions(input_ids.shape[1], self.global_step if stage == "train" else 0)
        positions = positions.to(input_ids.device)
        totals = dict(kl=0.0, balance=0.0, quantization=0.0)
        for layer in self.hashed_layers:
            losses = self.layer_losses(layer, *captured[layer], positions)
            for name in totals:
                totals[name] = totals[name] + losses[name] / len(self.hashed_layers)
        loss = totals["kl"] + self.hparams.balance_weight * totals["balance"] + (
            self.hparams.quantization_weight * totals["quantization"]
        )
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train")
        for name, value in totals.items():
            self.log(f"{stage}/{name}", value, sync_dist=stage != "train")
        if stage == "train":
            self.log("train/beta", self.beta)
        measure = stage != "train" or self.global_step % max(1, self.trainer.log_every_n_steps) == 0
        if measure:
            self._log_recall(stage, captured, positions)
        return loss

    def _log_recall(self, stage: str, captured, positions) -> None:
        sync = stage != "train"
        for name, encoders in (("recall", self.encoders), ("recall_random", self.random_encoders)):
            per_layer = torch.stack(
                [self.layer_recall(encoders, layer, *captured[layer], positions) for layer in self.hashed_layers]
            )
            self.log(f"{stage}/{name}", per_layer.mean(), prog_bar=name == "recall", sync_dist=sync)
            if stage == "val":
                self._val_recall.setdefault(name, []).append(per_layer)

    def on_validation_epoch_start(self) -> None:
        self._val_recall: dict[str, list[torch.Tensor]] = {}

    def on_validation_epoch_end(self) -> None:
        """Per-layer validation recall, trained and random, averaged over batches and ranks: ``last_recall``."""
        means = {name: self.all_gather(torch.stack(v).mean(0)).reshape(-1, len(self.hashed_layers)).mean(0)
                 for name, v in self._val_recall.items()}
        self.last_recall = {
            layer: {"trained": float(means["recall"][i]), "random": float(means["recall_random"][i])}
            for i, layer in enumerate(self.hashed_layers)
        }

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.encoders.parameters()] + [self.log_temperature]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=0.0)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 1000
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # enough to export the encoders from a checkpoint without loading the base model (`dashkv export`)
        checkpoint["dashkv"] = {
            "layout": asdict(self.encoders.layout),
            "config": self.config.to_dict(),
            "recall": getattr(self, "last_recall", None),
        }
