"""Reference log-probs computed once, stored on disk, reused while nothing they depend on changes.

The file name is a fingerprint of the model (its source files, dtype) and of the split's
token ids (which change with the data and with every tokenisation setting), so a later run
on the same model and data reads the file instead of running the reference forward again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lit_align.models import is_peft, resolve_name

log = logging.getLogger(__name__)


def model_fingerprint(policy_config) -> str:
    """Hash of where the weights come from: file names, sizes and config, or hub id + revision."""
    source = Path(resolve_name(policy_config.name_or_path))
    digest = hashlib.sha256(json.dumps([policy_config.dtype, policy_config.gguf_file, policy_config.revision]).encode())
    if source.is_dir():
        for file in sorted(source.iterdir()):
            if file.is_file():
                digest.update(f"{file.name}:{file.stat().st_size}".encode())
                if file.suffix == ".json":
                    digest.update(file.read_bytes())
    else:
        digest.update(str(source).encode())
    return digest.hexdigest()[:16]


class ReferenceCache:
    """Per-row reference log-probs `[N, 2]` (chosen, rejected) for the train and val splits."""

    def __init__(self, module, datamodule, cache_dir: Path):
        self.module, self.datamodule, self.cache_dir = module, datamodule, Path(cache_dir)
        self.tables: dict[str, Tensor] = {}

    def path(self, split: str) -> Path:
        model_fp = model_fingerprint(self.module.policy_config)
        return self.cache_dir / f"{model_fp}-{self.datamodule.fingerprint(split)}.pt"

    def prepare(self, resuming: bool = False) -> None:
        for split in ("train", "val"):
            rows = self.datamodule.train_set if split == "train" else self.datamodule.val_set
            if not rows:
                continue
            path = self.path(split)
            if path.exists():
                table = torch.load(path, weights_only=True)
                if table.shape != (len(rows), 2):
                    raise ValueError(f"{path}: holds {tuple(table.shape)} log-probs, expected ({len(rows)}, 2); delete it")
                log.info("reference log-probs for %s read from %s", split, path)
            else:
                if resuming and not is_peft(self.module.policy):
                    raise FileNotFoundError(
                        f"resuming with reference='cached' but {path} is missing, and a fully fine-tuned policy "
                        "no longer equals the reference: restore the cache file or use reference='copy'"
                    )
                table = self.compute(split)
                self.save(table, path)
            self.tables[split] = table

    @torch.no_grad()
    def compute(self, split: str) -> Tensor:
        module, policy = self.module, self.module.policy
        adapters_off = policy.disable_adapter() if is_peft(policy) else contextlib.nullcontext()
        was_training = policy.training
        policy.eval()
        out = []
        with adapters_off:
            for batch in tqdm(self.datamodule.eval_dataloader(split), desc=f"reference log-probs ({split})"):
                batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                logps, _ = module.sequence_logps(policy, *module.concatenated(batch))
                out.append(torch.stack(logps.float().chunk(2), dim=1).cpu())
        policy.train(was_training)
        return torch.cat(out)

    def save(self, table: Tensor, path: Path) -> None:
        trainer = self.module.trainer
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(table, tmp)
            tmp.replace(path)
            log.info("reference log-probs written to %s", path)
        trainer.strategy.barrier()

    def lookup(self, split: str, index: Tensor, device) -> tuple[Tensor, Tensor]:
        rows = self.tables[split][index.cpu()].to(device)
        return rows[:, 0], rows[:, 1]
