"""DashKVDistillation: train DASH-KV hash encoders to rank keys as the frozen model's attention does.

The base model stays frozen and its outputs unchanged. A forward pass with the "dashkv-train" attention told to
capture (``hf_dashkv.capture``) records every hashed layer's post-RoPE queries and keys; each training block is
captured once and its tensors are kept (``captured_positions`` late query positions and all keys, fp16), so
later steps train on them without running the model (``keep_captures``; with a joint LoRA the model changes, so
every step captures anew). Each step samples ``query_positions`` of a block's stored positions and trains every layer:

- inputs divided by their mean norm per head (``input_scale`` of the encoders, set from the first batch and
  averaged over ranks), so that ``tanh(beta * x)`` starts unsaturated; codes start as SimHash;
- the student: a softmax over the candidates (keys between the sinks and the recent window: the only ones the
  budget chooses among) of ``temperature * mean_b tanh(beta q_b) tanh(beta k_b)`` per query head;
- the teacher: the model's softmax over the candidates restricted to its ``teacher_top`` keys and renormalised
  (the keys a budget must catch; ``teacher_top=None`` keeps the whole list: the paper's list-wise KL);
- loss = cross-entropy(teacher, student) + ``balance_weight`` * (mean relaxed key bit)^2, beta annealed
  geometrically from ``beta_start`` to ``beta_end``;
- each step rotates the block's queries and keys by a random RoPE offset (``rope_shift``): exact (scores depend
  on relative positions only), and it keeps codes trained on 4k-token blocks from failing at 8k.

Why each of these choices (docs/experiments.md has the measurements): the paper's whole-list KL on raw inputs stayed
at SimHash's recall. Validation reports the probe's measure (docs/design.md §4: ``val/R@8``, ``val/R@1``, trained
and SimHash side by side).

Joint LoRA (optional, ``lora_rank > 0``; docs/design.md §1): peft LoRA on the attention projections, trained with the
encoders so that the adapted model under DASH-KV sparse attention ("dashkv-train" told ``dashkv_sparse``: each
position attends exactly to the rows a decode step would select) matches the frozen model under full attention:
KL on next-token logits. That pass holds one layer's ``[B, H, T, T]`` mask and scores at a time.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
from torch import nn

from hf_dashkv import TRAIN_IMPLEMENTATION, DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.embedded import load_model
from hf_dashkv.hub import lora_config, require_peft
from hf_dashkv.capture import capture_attention
from hf_dashkv.recall import attention_probs, ranking_recall
from hf_dashkv.selection import candidates, select
from hf_dashkv.selectors.hash import position_distances

VALIDATION_QUERIES = 32  # the last positions of a validation block, as the recall probe (`dashkv recall`) takes


class DashKVDistillation(L.LightningModule):
    """Hash encoders for a frozen causal LM, trained to rank keys as the model's own attention does.

    Args:
        model: an embedded model name (``smollm2-135m``) or a transformers path / Hub id.
        bits: code length. query_hidden: query MLP width (0: linear). dense_layers: layers left dense and
            untrained (negative indices count from the end); training every layer shows which to make dense.
        budget, sink_tokens, recent_tokens: the selection the candidates and validation recall follow.
        query_positions: query positions per block per step. captured_positions: positions kept per block,
            drawn from its last ``late_fraction`` (decoding queries come late in long contexts).
        teacher_top: the teacher's keys per query (``None``: all candidates, the paper's list-wise KL).
        rope_shift: each step rotates a block's queries and keys as if the block stood up to this many tokens later
            (0: off). Scores depend on relative positions only, so the teacher is unchanged, but the codes cannot
            learn the absolute RoPE angles of the training length: without it, encoders trained at 4k fell below
            SimHash at 8k.
        keep_captures: keep each training block's captured tensors for later steps (few blocks, a slow model: the
            CPU recipes); ``False`` captures at every step (many blocks on GPUs). A LoRA always captures anew.
        lr: Adam learning rate (constant). beta_start, beta_end: the ``tanh`` relaxation, annealed geometrically.
        balance_weight: weight of the bit-balance term.
        init_seed: seed of the random projections the encoders start from (SimHash), of the sampled positions,
            and of the LoRA init.
        lora_rank: 0 (default) trains the encoders alone; ``> 0`` adds a peft LoRA of this rank on ``lora_targets``
            (the attention projections), trained jointly (docs/design.md §1). lora_alpha: its scaling numerator.
        lora_weight: weight of the logit KL (full-attention frozen model || adapted model under "dashkv-train").
        shard_frozen_model: under a multi-process strategy (DDP), shard the frozen model's weights over the processes
            (FSDP2 ``fully_shard``, each decoder layer gathered for its forward and freed after), so that each GPU
            holds 1/world of them: for models that do not fit replicated. The encoders stay replicated (DDP syncs
            them; they are small). Not with a LoRA.
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
        query_positions: int = 32,
        captured_positions: int = 512,
        late_fraction: float = 0.75,
        teacher_top: int | None = 32,
        rope_shift: int = 16384,
        keep_captures: bool = True,
        lr: float = 1e-2,
        beta_start: float = 1.0,
        beta_end: float = 10.0,
        balance_weight: float = 0.1,
        init_seed: int = 0,
        lora_rank: int = 0,
        lora_alpha: int = 16,
        lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_weight: float = 1.0,
        shard_frozen_model: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.encoder_config = EncoderConfig(bits=bits, query_hidden=query_hidden)
        # the selection the candidates and validation follow; exported as the encoders' recommended policy
        self.policy = DecodePolicy(budget=budget, sink_tokens=sink_tokens, recent_tokens=recent_tokens)
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"DashKVDistillation.lora_rank={lora_rank!r}: must be an int >= 0 (0: no LoRA).")
        if teacher_top is not None and (not isinstance(teacher_top, int) or teacher_top < 1):
            raise ValueError(f"DashKVDistillation.teacher_top={teacher_top!r}: an int >= 1, or null for every key.")
        if shard_frozen_model and lora_rank:
            raise ValueError("DashKVDistillation: shard_frozen_model with a LoRA is not supported (the adapter lives in "
                             "the frozen model and DDP would sync it too): set lora_rank: 0 or shard_frozen_model: false.")
        if not 0.0 < late_fraction <= 1.0:
            raise ValueError(f"DashKVDistillation.late_fraction={late_fraction!r}: must lie in (0, 1].")
        base, self.tokenizer = load_model(model, attn_implementation=TRAIN_IMPLEMENTATION)
        base.requires_grad_(False)
        dense = tuple(dense_layers or ())
        self.encoders = HashEncoders.random(base.config, self.encoder_config, dense, seed=init_seed)
        self.encoders.policy = self.policy
        self.random_encoders = HashEncoders.random(base.config, self.encoder_config, dense, seed=init_seed)  # SimHash
        self.random_encoders.requires_grad_(False)
        self.hashed_layers = list(self.encoders.layout.hashed_layers)
        # student logits = temperature * similarity in [-1, 1]; start near the spread of attention logits
        self.log_temperature = nn.Parameter(torch.full((len(self.hashed_layers),), math.log(10.0)))
        self.register_buffer("scales_set", torch.tensor(False))  # input scales come from data, once (checkpointed)
        self._captures: dict[int, dict] = {}  # training block -> its captured tensors (encoders alone only)
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

    def configure_model(self) -> None:
        """``shard_frozen_model``: shard the frozen model over the processes, once the process group exists (Lightning
        calls this after setting it up, before DDP wraps the module; the frozen model is not a submodule)."""
        if not self.hparams.shard_frozen_model or self.trainer.world_size == 1 or self.sharded:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.trainer.strategy.root_device.type, (self.trainer.world_size,))
        for module in list(self.base.modules()):
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module, mesh=mesh)
        fully_shard(self.base, mesh=mesh)  # embeddings, final norm, head
        local = sum(p.to_local().numel() for p in self.base.parameters())
        total = sum(p.numel() for p in self.base.parameters())
        rank_zero_info(f"frozen model sharded over {self.trainer.world_size} processes: {local:,} of {total:,} "
                       "parameters held here")

    @property
    def sharded(self) -> bool:
        """Whether the frozen model is sharded over the processes (:meth:`configure_model`)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.base, FSDPModule)

    @property
    def beta(self) -> float:
        """The relaxation sharpness for the current step, annealed geometrically over ``max_steps``."""
        total = max(1, self.trainer.max_steps) if self._trainer is not None and self.trainer.max_steps > 0 else 1
        progress = min(1.0, self.global_step / total)
        return self.hparams.beta_start * (self.hparams.beta_end / self.hparams.beta_start) ** progress

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, positions: torch.Tensor) -> dict[int, tuple]:
        """``{layer: (query [B, Hq, P, D] at positions, key [B, Hkv, T, D], scaling)}``, post-RoPE, one frozen pass.

        With a LoRA the adapter is on: at inference the adapted model hashes its own keys and queries, and the
        selection has to cover the adapted model's attention, so that is what the encoders learn to rank.
        """
        if not self.sharded:  # a sharded model lives on its processes' devices already
            self.base.to(input_ids.device)
        captured = capture_attention(self.base, input_ids, max(self.hashed_layers))
        return {layer: (captured[layer][0][:, :, positions], captured[layer][1], captured[layer][3])
                for layer in self.hashed_layers}

    def late_positions(self, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` distinct sorted positions in the last ``late_fraction`` of a block, each with candidates."""
        low = max(self.policy.sink_tokens + self.policy.recent_tokens + 1,
                  length - int(self.hparams.late_fraction * length))
        if length <= low:
            raise ValueError(f"seq_len {length} leaves no hashing candidates: use more than {low} tokens.")
        return (low + torch.randperm(length - low, generator=generator)[:count]).sort().values

    def training_block(self, input_ids: torch.Tensor, index: int) -> tuple[dict, torch.Tensor]:
        """The captured tensors of one training block ``[1, T]`` and their positions ``[M]``: captured once and
        kept (fp16) when only the encoders train; with a LoRA, captured anew at every step."""
        if index not in self._captures:
            generator = torch.Generator().manual_seed(self.hparams.init_seed * 1_000_003 + index)
            positions = self.late_positions(input_ids.shape[1], self.hparams.captured_positions, generator)
            captured = self.capture(input_ids, positions.to(input_ids.device))
            if self.lora is not None or not self.hparams.keep_captures:
                return captured, positions
            self._captures[index] = {
                "layers": {layer: (q.half(), k.half(), scale) for layer, (q, k, scale) in captured.items()},
                "positions": positions,
            }
        # read back from the fp16 store even on first use: a resumed run starts with an empty store, and has to
        # see a block exactly as the uninterrupted run saw it again (unrounded on first sight, it does not)
        stored = self._captures[index]
        return {layer: (q.float(), k.float(), scale) for layer, (q, k, scale) in stored["layers"].items()}, \
            stored["positions"]

    def candidates(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """bool ``[P, T]``: the keys the budget chooses from for queries at ``positions`` (unpadded sequences)."""
        first = torch.zeros(1, dtype=torch.long, device=positions.device)
        return candidates(self.policy.sink_tokens, self.policy.recent_tokens, first, positions + 1, length)[0]

    @torch.no_grad()
    def set_input_scales(self, blocks: list[dict[int, tuple]]) -> None:
        """Each encoder's ``input_scale``: the mean norm of its head's queries and keys (keys after the sinks), per
        block of the first step, averaged over its blocks and the ranks: every rank trains the same encoders, and
        2 processes x batch b start where 1 process x batch 2b does."""
        sinks = self.policy.sink_tokens
        for layer in blocks[0]:
            scales = torch.stack([
                torch.cat([key[:, :, sinks:].norm(dim=-1).mean((0, 2)), query.norm(dim=-1).mean((0, 2))])
                for query, key, _ in (captured[layer] for captured in blocks)
            ]).mean(0)
            scales = self.trainer.strategy.reduce(scales, reduce_op="mean") if self._trainer is not None else scales
            kv_heads = blocks[0][layer][1].shape[1]
            self.encoders[layer].key.input_scale.copy_(scales[:kv_heads])
            self.encoders[layer].query.input_scale.copy_(scales[kv_heads:])
        self.scales_set.fill_(True)

    def layer_losses(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float, positions) -> dict:
        """Cross-entropy against the teacher's top keys, and bit balance, of one layer.

        Args:
            query: post-RoPE ``[B, Hq, P, D]`` at ``positions`` (``[P]``); key: ``[B, Hkv, T, D]``.

        Returns:
            ``{"ce", "balance", "unsaturated"}``: the last is the share of ``|beta x| < 1`` (the relaxation is live).
        """
        encoders, beta, bits = self.encoders[layer], self.beta, self.encoder_config.bits
        allowed = self.candidates(positions, key.shape[2])  # [P, T]
        with torch.no_grad():
            teacher = attention_probs(query, key, scale, allowed)  # [B, Hkv, G, P, T]
            if self.hparams.teacher_top is not None:
                top = teacher.topk(min(self.hparams.teacher_top, key.shape[2]), dim=-1)
                teacher = torch.zeros_like(teacher).scatter_(-1, top.indices, top.values)
                teacher = teacher / teacher.sum(-1, keepdim=True)
        key_pre = encoders.key(key.float())  # [B, Hkv, T, bits]
        query_pre = encoders.query(query.float().transpose(1, 2)).transpose(1, 2)  # [B, Hq, P, bits]
        k_code, q_code = torch.tanh(beta * key_pre), torch.tanh(beta * query_pre)
        similarity = q_code.unflatten(1, (key.shape[1], -1)) @ k_code.unsqueeze(2).transpose(-1, -2) / bits
        temperature = self.log_temperature[self.hashed_layers.index(layer)].exp()
        student = (temperature * similarity).masked_fill(~allowed, float("-inf")).log_softmax(-1)
        ce = -(teacher * student.masked_fill(teacher == 0, 0.0)).sum(-1).mean()
        balance = k_code[:, :, self.policy.sink_tokens:].mean(2).pow(2).mean()
        with torch.no_grad():
            unsaturated = torch.cat([(beta * key_pre).abs().lt(1).flatten(), (beta * query_pre).abs().lt(1).flatten()])
        return dict(ce=ce, balance=balance, unsaturated=unsaturated.float().mean())

    def training_step(self, batch, batch_idx):
        totals = dict(ce=0.0, balance=0.0, unsaturated=0.0)
        indices = batch["index"].tolist()
        blocks = [self.training_block(ids.view(1, -1), index) for ids, index in zip(batch["input_ids"], indices)]
        if not bool(self.scales_set):
            self.set_input_scales([captured for captured, _ in blocks])
        for ids, index, (captured, stored) in zip(batch["input_ids"], indices, blocks):
            # drawn per block and step, not per rank: the same blocks give the same draws however they are split
            generator = torch.Generator().manual_seed(
                (self.hparams.init_seed * 1_000_003 + self.global_step) * 1_000_033 + index
            )
            pick = torch.randperm(len(stored), generator=generator)[: self.hparams.query_positions].sort().values
            positions = stored[pick].to(ids.device)
            offset = int(torch.randint(0, self.hparams.rope_shift + 1, (), generator=generator))
            for layer, (query, key, scale) in captured.items():
                query, key = self.shifted(layer, offset, query[:, :, pick.to(query.device)], key)
                losses = self.layer_losses(layer, query, key, scale, positions)
                for name in totals:
                    totals[name] = totals[name] + losses[name] / (len(captured) * len(batch["index"]))
        loss = totals["ce"] + self.hparams.balance_weight * totals["balance"]
        if self.lora is not None:
            totals["lora_kl"] = self.lora_loss(batch["input_ids"])
            loss = loss + self.hparams.lora_weight * totals["lora_kl"]
        self.log("train/loss", loss, prog_bar=True)
        for name, value in totals.items():
            self.log(f"train/{name}", value)
        self.log("train/beta", self.beta)
        self.log("train/weight_shift", self.weight_shift())
        return loss

    @torch.no_grad()
    def shifted(self, layer: int, offset: int, *vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Post-RoPE vectors ``[B, H, T, D]`` rotated by ``offset`` more positions, with ``layer``'s own rotary
        embedding (its frequencies, and its layer type where a model has several, as Gemma 3 has)."""
        if offset == 0:
            return vectors
        model = self.base.get_base_model() if hasattr(self.base, "get_base_model") else self.base
        rotary = model.model.rotary_emb
        probe = vectors[0].new_zeros(1, 1, vectors[0].shape[-1])
        position = torch.tensor([[offset]], device=probe.device)
        layer_types = getattr(model.config, "layer_types", None)
        if "layer_type" in inspect.signature(rotary.forward).parameters and layer_types:
            cos, sin = rotary(probe, position, layer_types[layer])
        else:
            cos, sin = rotary(probe, position)
        norm = (cos.square() + sin.square()).sqrt()  # a pure rotation, whatever attention scaling the rope carries
        cos, sin = (cos / norm).float(), (sin / norm).float()  # [1, 1, D]
        half = vectors[0].shape[-1] // 2
        return tuple(x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin for x in vectors)

    @torch.no_grad()
    def weight_shift(self) -> torch.Tensor:
        """How far the projections moved from their SimHash start: ``|W - W0| / |W0|`` over keys and queries."""
        moved, start = 0.0, 0.0
        for layer in self.hashed_layers:
            for mine, theirs in ((self.encoders[layer].key.weight, self.random_encoders[layer].key.weight),
                                 (self.encoders[layer].query.proj, self.random_encoders[layer].query.proj)):
                moved, start = moved + (mine - theirs).norm() ** 2, start + theirs.norm() ** 2
        return (moved / start).sqrt()

    @torch.no_grad()
    def layer_ranking(self, encoders: HashEncoders, layer: int, query, key, scale, positions) -> dict:
        """``recall.ranking_recall`` of one layer's hash selection (hard codes) for queries ``[B, Hq, P, D]`` at
        ``positions``: ``{"R@1", "R@8", "R@32", "mass"}``, each ``[B, Hkv, G, P]``."""
        length = key.shape[2]
        scores = position_distances(encoders[layer], query, encoders[layer].encode_keys(key), self.policy.group_reduce)
        chosen = select(scores, self.policy, positions + 1).mask(length)
        allowed = self.candidates(positions, length).unsqueeze(0)
        return ranking_recall(query, key, chosen, allowed, positions, scale)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        """Candidate-only ``R@k|B`` (as ``dashkv recall`` measures it) at the last positions of each block."""
        for ids in batch["input_ids"]:
            length = ids.shape[0]
            positions = torch.arange(length - VALIDATION_QUERIES, length, device=ids.device)
            captured = self.capture(ids.view(1, -1), positions)
            for name, encoders in (("trained", self.encoders), ("simhash", self.random_encoders)):
                for layer, (query, key, scale) in captured.items():
                    measured = self.layer_ranking(encoders, layer, query, key, scale, positions)
                    for metric in ("R@1", "R@8", "mass"):
                        self._val.setdefault((name, metric), {}).setdefault(layer, []).append(measured[metric].mean())

    def on_validation_epoch_start(self) -> None:
        self._val: dict[tuple[str, str], dict[int, list[torch.Tensor]]] = {}

    def on_validation_epoch_end(self) -> None:
        """Logs the means over hashed layers (``val/R@8``, ``val/R@8_simhash``, ...) and keeps ``last_recall``:
        per layer, R@8|B of the trained and the SimHash codes, averaged over blocks and ranks."""
        per_layer = {}
        for (name, metric), layers in self._val.items():
            values = torch.stack([torch.stack(layers[layer]).mean() for layer in self.hashed_layers])
            values = self.all_gather(values).reshape(-1, len(self.hashed_layers)).mean(0)
            per_layer[(name, metric)] = values
            suffix = "" if name == "trained" else f"_{name}"
            self.log(f"val/{metric}{suffix}", values.mean(), prog_bar=metric == "R@8" and name == "trained",
                     sync_dist=True)  # already gathered: the same value on every rank
        if per_layer:
            self.last_recall = {
                layer: {"trained": float(per_layer[("trained", "R@8")][i]),
                        "random": float(per_layer[("simhash", "R@8")][i])}
                for i, layer in enumerate(self.hashed_layers)
            }

    def lora_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """KL(frozen model, full attention || adapted model, DASH-KV sparse attention) of next-token distributions.

        Averaged over the positions from ``sink_tokens + recent_tokens`` on (``[B, T - sinks - recent]``), the
        ones with hashing candidates, where selection can drop keys. Gradients reach the LoRA weights only: the
        selection itself (hard codes) is not differentiable.
        """
        with torch.no_grad(), self.base.disable_adapter():
            teacher = self.base(input_ids=input_ids, use_cache=False).logits
        student = self.base(input_ids=input_ids, use_cache=False, dashkv_sparse=(self.encoders, self.policy)).logits
        start = self.policy.sink_tokens + self.policy.recent_tokens
        teacher, student = (x[:, start:].flatten(0, 1).float().log_softmax(-1) for x in (teacher, student))
        return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # encoders, temperature, LoRA (if any)
        return torch.optim.Adam(params, lr=self.hparams.lr)  # constant: what the recipe measured best with

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # enough to export the encoders from a checkpoint without loading the base model (`dashkv export`)
        checkpoint["dashkv"] = {
            "layout": asdict(self.encoders.layout),
            "encoder_config": self.encoder_config.to_dict(),
            "policy": self.policy.to_dict(),
            "recall": getattr(self, "last_recall", None),
        }
