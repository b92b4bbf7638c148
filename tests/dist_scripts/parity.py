"""Helpers for tests/test_distributed_parity.py (importable via PYTHONPATH as "parity.<name>").

* `PerPromptSeedGRPO`: GRPO whose sampling gives a prompt the same completions whichever
  process holds it and whatever else is in its batch: each prompt is sampled on its own
  (padding stripped) with a seed from its text and the step, by GRPOModule's own sampler (under
  FSDP2 inside `gathered_parameters`). Everything after sampling is GRPOModule's.
* `ParityRecorder`: the losses (mean over ranks) and, at the end, the full trainable weights
  (DTensor shards gathered), written by rank 0.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from lit_align.generation import Completions
from lit_align.modules.grpo import GRPOModule


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def merge(parts: list[Completions], pad: int) -> Completions:
    """Row-wise concatenation: prompts left-padded, completions right-padded to the widest."""
    p = max(c.prompt_ids.shape[1] for c in parts)
    w = max(c.completion_ids.shape[1] for c in parts)
    left = lambda t, width, fill: F.pad(t, (width - t.shape[1], 0), value=fill)  # noqa: E731
    right = lambda t, width, fill: F.pad(t, (0, width - t.shape[1]), value=fill)  # noqa: E731
    return Completions(
        texts=[t for c in parts for t in c.texts],
        prompt_ids=torch.cat([left(c.prompt_ids, p, pad) for c in parts]),
        prompt_mask=torch.cat([left(c.prompt_mask, p, 0) for c in parts]),
        completion_ids=torch.cat([right(c.completion_ids, w, pad) for c in parts]),
        completion_mask=torch.cat([right(c.completion_mask, w, 0) for c in parts]),
        truncated=torch.cat([c.truncated for c in parts]),
    )


class PerPromptSeedGRPO(GRPOModule):
    def sample(self, batch: dict, seed):
        parts = []
        for prompt, ids, mask in zip(batch["prompt"], batch["prompt_input_ids"], batch["prompt_attention_mask"]):
            row = ids[mask.bool()][None]
            single = {"prompt_input_ids": row, "prompt_attention_mask": torch.ones_like(row)}
            parts.append(super().sample(single, zlib.crc32(prompt_key(prompt).encode()) + self.global_step))
        return merge(parts, self.tokenizer.pad_token_id)


def length_reward(prompts, completions, **columns):
    """Characters of the completion: differs within each group, so advantages are non-zero."""
    return [float(len(c)) for c in completions]


class ParityRecorder(L.Callback):
    def __init__(self, path: str, attr: str = "policy"):
        self.path, self.attr = Path(path), attr
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # manual optimisation (GRPO): the logged loss
            loss = trainer.callback_metrics["loss"]
        self.losses.append(float(pl_module.all_gather(loss.detach().float()).mean()))

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        weights = {}
        for name, p in getattr(pl_module, self.attr).named_parameters():
            if p.requires_grad:  # full_tensor() is a collective: every rank calls it
                weights[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
        if trainer.is_global_zero:
            torch.save(weights, self.path.with_suffix(".pt"))
            result = {"losses": self.losses, "world_size": trainer.world_size, "global_step": trainer.global_step}
            self.path.write_text(json.dumps(result))
