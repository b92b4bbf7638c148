"""GRPO on the tiny model (sampled rollouts, a KL reference, a length reward); optionally
SIGKILLs itself at the start of a given step, or resumes from the last checkpoint.

    python train_grpo.py --model DIR --data FILE --out DIR [--kill-at-step K] [--resume]

Writes OUT/metrics.jsonl (float.hex, appended), OUT/ckpts/*.ckpt and, when it finishes,
OUT/final.pt (policy weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lit_align.data.datamodule import AlignDataModule  # noqa: E402
from lit_align.models import PolicyConfig  # noqa: E402
from lit_align.modules.grpo import GRPOModule  # noqa: E402
from lit_align.modules.grpo_config import GRPOLossConfig, GRPOSamplingConfig  # noqa: E402
from lit_align.reliability import reliability_callbacks  # noqa: E402
from train_dpo import JsonlLogger, KillAtStep  # noqa: E402


def length_reward(prompts, completions, **columns):
    """Prefers completions of about 12 characters (anything that varies within a group)."""
    return [-abs(len(c) - 12) / 12 for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    L.seed_everything(0)
    module = GRPOModule(
        PolicyConfig(name_or_path=args.model), reward_funcs=[length_reward],
        sampling=GRPOSamplingConfig(num_generations=3, max_new_tokens=8), loss=GRPOLossConfig(beta=0.04),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    data = AlignDataModule(
        args.data, mode="prompts", format="hh_rlhf", limit=24, batch_size=2, val_fraction=0.1,
        max_prompt_length=32, on_bad_rows="skip",
    )
    callbacks = [ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=3, save_top_k=-1, save_last=True)]
    callbacks += reliability_callbacks()
    if args.kill_at_step is not None:
        callbacks.append(KillAtStep(args.kill_at_step))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.max_steps, limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=1, logger=JsonlLogger(out / "metrics.jsonl"), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(out / "ckpts" / "last.ckpt") if args.resume else None)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("reference.")}
    torch.save(weights, out / "final.pt")


if __name__ == "__main__":
    main()
