"""`AlignDataModule`: the one DataModule every lit_align module trains on."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Literal, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_align.checks import ConfigError, check_range
from lit_align.data.collate import Collator, encode_row
from lit_align.data.formats import FORMATS, MODES, PRESETS, Format, Mode, load_rows, load_source, normalize_rows
from lit_align.data.rerank import DECISION_KEY, ReRanker, check_reranking
from lit_align.reliability import ResumableDataLoader, ResumableSampler

log = logging.getLogger(__name__)


def check_data_numbers(args: dict) -> None:
    """Refuse counts and lengths out of range (`args`: AlignDataModule's arguments by name)."""
    for name, low in (("batch_size", 1), ("max_prompt_length", 1), ("max_completion_length", 1), ("limit", 1),
                      ("num_workers", 0), ("pad_to_multiple_of", 1)):
        check_range(f"data.{name}", args[name], low, why="null turns it off" if name.startswith("max_") else "")


class AlignDataModule(L.LightningDataModule):
    """Preference pairs, prompts or labelled texts, tokenised with the model's chat template.

    Args:
        path: A hub id or a local .json / .jsonl(.gz) / .csv / .parquet file.
        mode: "preference" (DPO, reward models), "prompts" (GRPO) or "labeled" (probes).
        format: Column preset: "generic", "hh_rlhf" or "pku_saferlhf".
        val_path: A separate validation source; otherwise `val_fraction` of `path` is held out.
        val_fraction: Share of rows held out for validation when `val_path` is not given.
        split: Split to read from a hub dataset.
        tokenizer: Tokenizer directory or hub id; by default the training module's own.
        max_prompt_length: Prompt tokens kept (see `prompt_truncation`).
        max_completion_length: Completion tokens kept, from the start (EOS included).
        prompt_truncation: Which end of a long prompt to keep: "end" (the recent turns) or "start".
        batch_size: Examples (pairs, prompts or texts) per device per step.
        shuffle: Shuffle training rows each epoch (seeded: the same order every run).
        seed: Seed for the split and the shuffle.
        limit: Use only the first `limit` rows of the source (quick runs).
        on_bad_rows: "error" stops at the first bad row naming file, row and field; "skip"
            drops such rows and logs how many.
        reranker: The re-ranking hook (preference mode only; identity by default). One that scores
            pairs itself decides on each training batch here; one that needs probe scores
            (ConfidenceReRanker) is called by the module with its own forward's scores.
        num_workers: DataLoader workers.
        pad_to_multiple_of: Pad sequence lengths up to a multiple of this (tensor-core friendly).
    """

    def __init__(
        self,
        path: str,
        mode: Mode = "preference",
        format: Format = "generic",
        val_path: Optional[str] = None,
        val_fraction: float = 0.05,
        split: str = "train",
        tokenizer: Optional[str] = None,
        max_prompt_length: Optional[int] = 512,
        max_completion_length: Optional[int] = 256,
        prompt_truncation: Literal["end", "start"] = "end",
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        limit: Optional[int] = None,
        on_bad_rows: Literal["error", "skip"] = "error",
        reranker: Optional[ReRanker] = None,
        num_workers: int = 0,
        pad_to_multiple_of: int = 1,
    ):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"data.mode={mode!r}: choose one of {MODES}")
        if format not in PRESETS:  # the registry (a format added at run time is one too)
            raise ConfigError(f"data.format={format!r}: choose one of {FORMATS}")
        if prompt_truncation not in ("end", "start"):
            raise ConfigError(f"data.prompt_truncation={prompt_truncation!r}: choose 'end' or 'start'")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
        check_data_numbers(locals())
        if reranker is not None and reranker.effects() and mode != "preference":
            raise ConfigError(f"data.reranker re-ranks preference pairs, but data.mode={mode!r} has none: remove data.reranker")
        self.save_hyperparameters(ignore=["reranker"])
        self.path, self.mode, self.format = path, mode, format
        self.val_path, self.val_fraction, self.split = val_path, val_fraction, split
        self.tokenizer_name = tokenizer
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        self.prompt_truncation = prompt_truncation
        self.batch_size, self.shuffle, self.seed, self.limit = batch_size, shuffle, seed, limit
        self.on_bad_rows, self.num_workers = on_bad_rows, num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.reranker = reranker if reranker is not None else ReRanker()
        self.tokenizer = None
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.skipped_rows = 0
        self.train_sampler: Optional[ResumableSampler] = None
        self._sampler_state: dict = {}  # from a checkpoint, applied when the train loader is built

    # ------------------------------------------------------------------ setup
    def _read(self, path: str) -> list[dict]:
        source = load_source(path, self.split)
        if self.limit is not None:
            source = source.select(range(min(self.limit, len(source))))
        rows, skipped = normalize_rows(source, self.format, self.mode, self.on_bad_rows, source=path)
        self.skipped_rows += skipped
        if not rows:
            raise ConfigError(f"{path}: no usable rows (format={self.format}, mode={self.mode})")
        return rows

    def _resolve_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is not None:
            from lit_align.models import PolicyConfig, load_tokenizer

            return load_tokenizer(PolicyConfig(name_or_path=self.tokenizer_name))
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or getattr(module, "tokenizer", None) is None:
            raise ConfigError("AlignDataModule needs a tokenizer: set data.tokenizer, or train a module that has one")
        return module.tokenizer

    def setup(self, stage: Optional[str] = None) -> None:
        if stage == "fit" and self.trainer is not None:
            self.check_reranker(self.trainer.lightning_module)
        if self.train_set:
            return
        self.tokenizer = self._resolve_tokenizer()
        rows = self._read(self.path)
        if self.val_path is not None:
            train_rows, val_rows = rows, self._read(self.val_path)
        else:
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = int(round(len(rows) * self.val_fraction))
            val_rows = [rows[i] for i in sorted(order[:n_val])]
            train_rows = [rows[i] for i in sorted(order[n_val:])]
        self.train_set = self.encode(train_rows)
        self.val_set = self.encode(val_rows)
        if self.skipped_rows:
            log.warning("skipped %d bad rows in total (on_bad_rows=skip)", self.skipped_rows)
        log.info("data: %d train / %d val %s rows", len(self.train_set), len(self.val_set), self.mode)

    def check_reranker(self, module) -> None:
        """Refuse a re-ranker that a module reading no decision would ignore; modules that read
        decisions (DPOModule, RewardModule) check their set-up in their own `check_reranker`."""
        if not hasattr(module, "check_reranker"):
            check_reranking(self.reranker, type(module).__name__, honours=(), has_scores=False)

    def encode(self, rows: list[dict]) -> list[dict]:
        encoded = []
        for index, row in enumerate(rows):
            example = encode_row(
                self.tokenizer, row, self.mode, self.max_prompt_length, self.max_completion_length, self.prompt_truncation
            )
            example["index"] = index
            encoded.append(example)
        return encoded

    def fingerprint(self, split: str = "train") -> str:
        """A hash of the split's token ids: changes with the data and every tokenisation setting."""
        digest = hashlib.sha256(json.dumps({"mode": self.mode}).encode())
        for example in self.train_set if split == "train" else self.val_set:
            for key in ("prompt_ids", "chosen_ids", "rejected_ids", "input_ids"):
                if key in example:
                    digest.update(bytes(json.dumps(example[key]), "utf8"))
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ loaders
    def collator(self) -> Collator:
        return Collator(self.mode, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        if len(self.train_set) < self.batch_size:
            raise ConfigError(
                f"{self.path}: the train split has {len(self.train_set)} rows, fewer than data.batch_size="
                f"{self.batch_size}; lower the batch size or add data"
            )
        # the order is a function of (seed, epoch) and the position is checkpointed: exact resume
        # data-parallel shards as the strategy defines them (tensor-parallel ranks share data)
        strategy = self.trainer.strategy if self.trainer is not None else None
        shards = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        self.train_sampler = ResumableSampler(
            self.train_set,
            num_replicas=shards.get("num_replicas", 1),
            rank=shards.get("rank", 0),
            shuffle=self.shuffle,
            seed=self.seed,
        )
        self.train_sampler.load_state_dict(self._sampler_state)
        self._sampler_state = {}
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.train_sampler,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def eval_dataloader(self, split: str = "val") -> DataLoader:
        """Fixed order, for validation and for precomputing per-row values (reference log-probs)."""
        data = self.val_set if split == "val" else self.train_set
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, collate_fn=self.collator(), num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            if self.train_sampler is not None:
                self.train_sampler.advance(len(batch["index"]))  # trained-on, not merely prefetched
            if self.mode == "preference":
                decision = self.reranker(batch)  # None unless the re-ranker scores pairs itself
                if decision is not None:
                    batch[DECISION_KEY] = decision
        return batch

    def state_dict(self) -> dict:
        sampler = self.train_sampler.state_dict() if self.train_sampler is not None else {}
        return {"reranker": self.reranker.state_dict(), "train_sampler": sampler}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reranker.load_state_dict(state_dict.get("reranker", {}))
        self._sampler_state = state_dict.get("train_sampler", {})


__all__ = ["AlignDataModule", "load_rows"]
