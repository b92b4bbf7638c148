"""A 2-process gloo DDP run of the tiny DPO model in which rank 1 SIGKILLs itself at the start
of step `--kill-at-step`; rank 0 must fail with a clear error instead of hanging.

    python ddp_kill_rank.py --model DIR --data FILE --out DIR [--kill-at-step 2] [--timeout 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lit_align.data.datamodule import AlignDataModule  # noqa: E402
from lit_align.models import PolicyConfig  # noqa: E402
from lit_align.modules.dpo import DPOModule  # noqa: E402
from lit_align.reliability import reliability_callbacks  # noqa: E402


class KillRank(Callback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at-step", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=30.0, help="process-group timeout in seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = DPOModule(PolicyConfig(name_or_path=args.model), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = AlignDataModule(args.data, format="hh_rlhf", limit=32, batch_size=2, max_prompt_length=32,
                           max_completion_length=16, on_bad_rows="skip")
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=args.timeout))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False, limit_val_batches=0,
        callbacks=[KillRank(1, args.kill_at_step), *reliability_callbacks()], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out,
    )
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
