"""Trains the tiny DPO model, checkpointing every step through lit_align's atomic writer; the
checkpoint of step `--kill-at-save` carries an object whose pickling SIGKILLs the process, i.e.
the process dies half-way through writing that checkpoint.

    python kill_during_save.py --model DIR --data FILE --out DIR [--kill-at-save N] [--plain-torch-save]

`--plain-torch-save` (a control) writes checkpoints with a bare `torch.save(checkpoint, path)`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lit_align.data.datamodule import AlignDataModule  # noqa: E402
from lit_align.models import PolicyConfig  # noqa: E402
from lit_align.modules.dpo import DPOModule  # noqa: E402
from lit_align.reliability import reliability_callbacks  # noqa: E402


class KillWhenPickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


class PlantKiller(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == self.step:
            checkpoint["killer"] = KillWhenPickled()


class PlainTorchSave(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at-save", type=int, default=3)
    parser.add_argument("--plain-torch-save", action="store_true")
    args = parser.parse_args()
    L.seed_everything(0)
    module = DPOModule(PolicyConfig(name_or_path=args.model), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = AlignDataModule(args.data, format="hh_rlhf", limit=24, batch_size=4, max_prompt_length=32,
                           max_completion_length=16, on_bad_rows="skip")
    callbacks = [ModelCheckpoint(dirpath=Path(args.out), every_n_train_steps=1, save_top_k=0, save_last=True),
                 PlantKiller(args.kill_at_save)]
    callbacks += [c for c in reliability_callbacks() if not (args.plain_torch_save and type(c).__name__ == "AtomicCheckpoints")]
    trainer = L.Trainer(accelerator="cpu", max_steps=args.kill_at_save + 1, logger=False, callbacks=callbacks,
                        plugins=[PlainTorchSave()] if args.plain_torch_save else None, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out)
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
