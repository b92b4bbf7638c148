"""Reference log-probs computed once, stored on disk, reused while nothing they depend on changes.

The file name is a fingerprint of the reference weights' content (see `model_fingerprint`) and
of the split's token ids (which change with the data and with every tokenisation setting), so
a later run on the same model and data reads the file instead of running the reference forward
again, and a run on other weights, even re-saved into the same folder, computes its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lit_align.models import is_peft, resolve_name

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 2  # bump when the fingerprint or the stored values change meaning
SAMPLE = 4096  # values sampled per tensor (or byte windows per large non-safetensors file)
SMALL_FILE = 16 << 20  # files up to this size are hashed whole (configs, tokenizer, tiny models)
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def model_source(policy_config) -> Path:
    """The local directory the reference weights are loaded from (a hub id: its cached snapshot)."""
    source = Path(resolve_name(policy_config.name_or_path))
    if source.is_dir():
        return source
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            policy_config.name_or_path, revision=policy_config.revision,
            cache_dir=policy_config.extra.get("cache_dir"), local_files_only=True,
        ))
    except Exception as err:
        raise FileNotFoundError(
            f"model.reference='cached' fingerprints the reference weights' content, but {policy_config.name_or_path!r} "
            "is neither a local directory nor in the Hugging Face cache: download it first or use reference='copy'"
        ) from err


def safetensors_sample(path: Path, digest, sample: int = SAMPLE) -> None:
    """Hash the header (names, dtypes, shapes) and a strided sample of every tensor's values,
    read from a memory map: cost grows with the number of tensors, not the file size."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = f.read(length)
    digest.update(header)
    if path.stat().st_size <= 8 + length:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
    for name, info in sorted(json.loads(header).items()):
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        width = DTYPE_BYTES.get(info["dtype"], 1)  # 1-byte and packed dtypes: sample bytes
        count = (end - start) // width
        offsets = start + np.arange(0, count, max(1, count // sample)) * width
        digest.update(data[(offsets[:, None] + np.arange(width)).ravel()].tobytes())


def file_sample(path: Path, digest, sample: int = SAMPLE, window: int = 64) -> None:
    """Small files whole; larger ones (GGUF, pickled weights) as `sample` evenly spaced byte windows."""
    size = path.stat().st_size
    if size <= SMALL_FILE:
        digest.update(path.read_bytes())
        return
    data = np.memmap(path, dtype=np.uint8, mode="r")
    starts = np.linspace(0, size - window, sample).astype(np.int64)
    digest.update(data[(starts[:, None] + np.arange(window)).ravel()].tobytes())


def model_fingerprint(policy_config) -> str:
    """Hash of the reference weights' content and of how they are loaded.

    Every top-level file of the model directory enters with its name and size; safetensors
    weights through a strided sample of every tensor (as `lit_align.probes.features` samples
    parameters), other files whole or, above 16 MiB, by sampled byte windows. Other weights of
    the same shapes re-saved into the same folder change the sampled values, so they get a new
    fingerprint; an edit confined to values between the samples would not (use
    reference='copy' after such surgery). The files, not the module in memory, are hashed so
    that a resumed run, whose policy has trained away from them, finds its cache again.
    """
    cfg = policy_config
    settings = [FINGERPRINT_VERSION, cfg.dtype, cfg.gguf_file, cfg.revision, cfg.attn_implementation, cfg.extra]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    source = model_source(cfg)
    files = {p for p in source.iterdir() if p.is_file()}
    if cfg.gguf_file:
        files.add(source / cfg.gguf_file)
    for file in sorted(files):
        digest.update(f"{file.relative_to(source)}:{file.stat().st_size}".encode())
        (safetensors_sample if file.suffix == ".safetensors" else file_sample)(file, digest)
    return digest.hexdigest()[:16]


class ReferenceCache:
    """Per-row reference log-probs `[N, 2]` (chosen, rejected) for the train and val splits."""

    def __init__(self, module, datamodule, cache_dir: Path):
        self.module, self.datamodule, self.cache_dir = module, datamodule, Path(cache_dir)
        self.tables: dict[str, Tensor] = {}
        self.model_fp: str | None = None

    def path(self, split: str) -> Path:
        if self.model_fp is None:
            self.model_fp = model_fingerprint(self.module.policy_config)
        return self.cache_dir / f"{self.model_fp}-{self.datamodule.fingerprint(split)}.pt"

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
