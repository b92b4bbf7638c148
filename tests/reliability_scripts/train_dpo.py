"""DPO on the tiny model with a co-trained probe and a flip re-ranker; optionally SIGKILLs
itself at the start of a given step, or resumes from the last checkpoint.

    python train_dpo.py --model DIR --data FILE --probe FILE --out DIR [--kill-at-step K] [--resume]

Writes OUT/metrics.jsonl (every logged value as float.hex, appended), OUT/ckpts/*.ckpt and,
when it finishes, OUT/final.pt (policy + probe weights) and OUT/reranker.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lit_align.data.datamodule import AlignDataModule  # noqa: E402
from lit_align.models import PolicyConfig  # noqa: E402
from lit_align.modules.base import WarmupCosineLR  # noqa: E402
from lit_align.modules.dpo import DPOModule  # noqa: E402
from lit_align.probes.rerank import ConfidenceReRanker  # noqa: E402
from lit_align.reliability import reliability_callbacks  # noqa: E402



class JsonlLogger(Logger):
    """Appends every logged metric, exactly (float.hex), one line per call."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    name, version = "jsonl", 0

    def log_metrics(self, metrics, step=None):
        row = {"step": step, **{k: float(v).hex() for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class KillAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--probe", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=14)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-rng-states", action="store_true", help="control: leave RNG states out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    L.seed_everything(0)
    # attention dropout makes every step draw random numbers: resume must restore the RNG
    policy = PolicyConfig(name_or_path=args.model, extra={"attention_dropout": 0.1})
    module = DPOModule(
        policy, probe_path=args.probe, co_train_probe=True,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=2, total_steps=args.max_steps),
    )
    data = AlignDataModule(
        args.data, format="hh_rlhf", limit=40, batch_size=4, val_fraction=0.1, max_prompt_length=32,
        max_completion_length=16, on_bad_rows="skip", reranker=ConfidenceReRanker("flip", "pair"),
    )
    callbacks = [ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=3, save_top_k=-1, save_last=True)]
    callbacks += [c for c in reliability_callbacks() if not (args.no_rng_states and type(c).__name__ == "RNGStates")]
    if args.kill_at_step is not None:
        callbacks.append(KillAtStep(args.kill_at_step))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.max_steps, val_check_interval=4, limit_val_batches=1,
        num_sanity_val_steps=0, log_every_n_steps=1, logger=JsonlLogger(out / "metrics.jsonl"),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(out / "ckpts" / "last.ckpt") if args.resume else None)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("reference.")}
    torch.save(weights, out / "final.pt")
    (out / "reranker.json").write_text(json.dumps(data.reranker.state_dict()))


if __name__ == "__main__":
    main()
