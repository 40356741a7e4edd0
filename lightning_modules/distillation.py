"""DashKVDistillation: train DASH-KV hash encoders by list-wise attention distillation (arXiv 2604.19351, §3.3).

The base model stays frozen and its outputs unchanged. One forward pass with the "dashkv-train" attention told to
capture (``Capture``) records every layer's post-RoPE queries and keys (the vectors attention scores use). For a sample of query
positions, the teacher is the model's own softmax attention over the hashing candidates (the causal keys
between the sinks and the recent window, which are always attended anyway); the student is a softmax over
the relaxed hash similarity ``tanh(beta * code_q) . tanh(beta * code_k) / bits`` times a learned temperature.
Loss = KL(teacher || student) + 0.1 bit balance + 0.1 quantization, with beta annealed from 1 to 10.

Memory is one layer's ``[B, H, positions, T]`` block at a time, never ``T x T``.

Joint LoRA (optional, ``lora_rank > 0``; design.md §1): peft LoRA on the attention projections, trained with the
encoders so that the adapted model under DASH-KV sparse attention ("dashkv-train" told ``dashkv_sparse``: each
position attends exactly to the rows a decode step would select) matches the frozen model under full attention: KL on next-token logits.
That pass holds one layer's ``[B, H, T, T]`` mask and scores at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
from torch import nn

from hf_dashkv import TRAIN_IMPLEMENTATION, DashKVConfig, HashEncoders
from hf_dashkv.apps.models import load_model
from hf_dashkv.capture import capture_attention, selection_mask
from hf_dashkv.recall import attention_probs, selected_mass
from hf_dashkv.selection import candidates

ADAPTER_NAME = "default"  # peft's name for the one adapter


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
        init_seed: seed of the random projections the encoders start from (SimHash), and of the LoRA init.
        lora_rank: 0 (default) trains the encoders alone; ``> 0`` adds a peft LoRA of this rank on ``lora_targets``
            (the attention projections), trained jointly (design.md §1). lora_alpha: its scaling numerator.
        lora_weight: weight of the logit KL (full-attention frozen model || adapted model under "dashkv-train").
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
        lora_rank: int = 0,
        lora_alpha: int = 16,
        lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_weight: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = DashKVConfig(
            bits=bits, budget=budget, sink_tokens=sink_tokens, recent_tokens=recent_tokens,
            dense_layers=tuple(dense_layers or ()), query_hidden=query_hidden,
        )
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"DashKVDistillation.lora_rank={lora_rank!r}: must be an int >= 0 (0: no LoRA).")
        base, self.tokenizer = load_model(model, attn_implementation=TRAIN_IMPLEMENTATION)
        base.requires_grad_(False)
        self.encoders = HashEncoders.random(base.config, self.config, seed=init_seed)
        self.random_encoders = HashEncoders.random(base.config, self.config, seed=init_seed)
        self.random_encoders.requires_grad_(False)
        self.hashed_layers = list(self.encoders.layout.hashed_layers)
        # student logits = temperature * similarity in [-1, 1]; start near the spread of attention logits
        self.log_temperature = nn.Parameter(torch.full((len(self.hashed_layers),), math.log(10.0)))
        self.lora: nn.ParameterDict | None = None
        if lora_rank:
            with torch.random.fork_rng(devices=[]):  # the same adapter init for the same init_seed, whatever ran before
                torch.manual_seed(init_seed)
                base = require_peft().get_peft_model(base, lora_config(lora_rank, lora_alpha, lora_targets))
            # The base stays out of the module (below), but its adapter must be optimized, checkpointed, resumed and
            # DDP-synced: this dict holds the very Parameter objects the peft layers use (not copies), under their
            # peft names with "/" for "." (parameter names cannot hold dots). Device moves of the module update
            # them in place, so the peft layers keep seeing them.
            self.lora = nn.ParameterDict(
                {name.replace(".", "/"): p for name, p in base.named_parameters() if p.requires_grad}
            )
        self.__dict__["base"] = base  # not a submodule: frozen, never saved in checkpoints, never wrapped by DDP

    @property
    def beta(self) -> float:
        """The relaxation sharpness for the current step, annealed linearly over ``max_steps``."""
        total = max(1, self.trainer.max_steps) if self._trainer is not None and self.trainer.max_steps > 0 else 1
        progress = min(1.0, self.global_step / total)
        return self.hparams.beta_start + (self.hparams.beta_end - self.hparams.beta_start) * progress

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
        """``(query [B, Hq, T, D], key [B, Hkv, T, D], scaling)`` of every layer, post-RoPE, from one frozen pass.

        With a LoRA the adapter is on: at inference the adapted model hashes its own keys and queries, and the
        selection has to cover the adapted model's attention, so that is what the encoders learn to rank.
        """
        self.base.to(input_ids.device)
        captured = capture_attention(self.base, input_ids, max(self.hashed_layers))
        return {layer: (q, k, scaling) for layer, (q, k, _, scaling) in captured.items()}

    def sample_positions(self, length: int, step: int) -> torch.Tensor:
        """``query_positions`` distinct positions with candidates before them, the same on every rank for a step."""
        low = self.config.sink_tokens + self.config.recent_tokens + 1
        if length <= low:
            raise ValueError(f"seq_len {length} leaves no hashing candidates: use more than {low} tokens.")
        generator = torch.Generator().manual_seed(self.hparams.init_seed * 1_000_003 + step)
        count = min(self.hparams.query_positions, length - low)
        return (low + torch.randperm(length - low, generator=generator)[:count]).sort().values

    def candidates(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """bool ``[P, T]``: the keys the budget chooses from for queries at ``positions`` (unpadded sequences)."""
        first = torch.zeros(1, dtype=torch.long, device=positions.device)
        return candidates(self.config, first, positions + 1, length)[0]

    def layer_losses(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float, positions) -> dict:
        """KL, bit balance and quantization of one layer for the sampled query positions."""
        encoders = self.encoders[layer]
        beta = self.beta
        length, group = key.shape[2], query.shape[1] // key.shape[1]
        q = query[:, :, positions].float()  # [B, Hq, P, D]
        candidates = self.candidates(positions, length)  # [P, T]
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
        """Share of the teacher's full attention mass on what a decode step at each sampled position selects
        (``selection_mask``: sinks + recent + the budget of that position's context, hard codes)."""
        length = key.shape[2]
        q = query[:, :, positions]
        causal = torch.arange(length, device=q.device) <= positions.unsqueeze(1)  # [P, T]
        probs = attention_probs(q, key, scale, causal)  # [B, Hkv, G, P, T]
        return selected_mass(probs, selection_mask(encoders[layer], self.config, q, key, positions)).mean()

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
        if self.lora is not None:
            totals["lora_kl"] = self.lora_loss(input_ids)
            loss = loss + self.hparams.lora_weight * totals["lora_kl"]
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train")
        for name, value in totals.items():
            self.log(f"{stage}/{name}", value, sync_dist=stage != "train")
        if stage == "train":
            self.log("train/beta", self.beta)
        measure = stage != "train" or self.global_step % max(1, self.trainer.log_every_n_steps) == 0
        if measure:
            self._log_recall(stage, captured, positions)
        return loss

    def lora_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """KL(frozen model, full attention || adapted model, DASH-KV sparse attention) of next-token distributions.

        Averaged over the positions from ``sink_tokens + recent_tokens`` on (``[B, T - sinks - recent]``), the
        ones with hashing candidates, where selection can drop keys. Gradients reach the LoRA weights only: the
        selection itself (hard codes) is not differentiable.
        """
        with torch.no_grad(), self.base.disable_adapter():
            teacher = self.base(input_ids=input_ids, use_cache=False).logits
        student = self.base(input_ids=input_ids, use_cache=False, dashkv_sparse=self.encoders).logits
        start = self.config.sink_tokens + self.config.recent_tokens
        teacher, student = (x[:, start:].flatten(0, 1).float().log_softmax(-1) for x in (teacher, student))
        return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")

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
        params = [p for p in self.parameters() if p.requires_grad]  # encoders, temperature, LoRA (if any)
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
