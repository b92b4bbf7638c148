"""A Lightning callback the distributed tests add to `lit-align fit` runs (importable via PYTHONPATH).

It records, on every rank and written by rank 0 to `path` (JSON):
- `losses`: each step's loss averaged over ranks (each rank's mean over an equal share of the
  global batch, so this is the global-batch loss a 1-process run computes);
- `sharding`: for every model attribute (policy, reference, model) whether all parameters are
  DTensors whose local shard holds 1/world of dim 0 (when dim 0 divides by the world size),
  and whether any FSDP unit mixes frozen and trainable parameters;
- `generated`: greedy tokens from the trained (peft) policy under `gathered_parameters`, each
  rank asking for a different number of tokens (transformers keeps the ranks in step).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

PROMPT = "Human: tell me a joke."


class DistRecorder(L.Callback):
    def __init__(self, path: str, model_attrs: list[str] = ["policy", "reference"], generate: bool = True):
        self.path = Path(path)
        self.model_attrs, self.generate = model_attrs, generate
        self.result: dict = {"losses": []}

    def on_train_start(self, trainer, pl_module):
        self.result["world_size"] = trainer.world_size
        self.result["start_step"] = trainer.global_step
        self.result["sharding"] = {
            attr: sharding_report(getattr(pl_module, attr), trainer.world_size)
            for attr in self.model_attrs
            if getattr(pl_module, attr, None) is not None
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # manual optimisation (GRPO) returns nothing: take the logged loss
            loss = trainer.callback_metrics["loss"]
        self.result["losses"].append(float(pl_module.all_gather(loss.detach().float()).mean()))

    def on_train_end(self, trainer, pl_module):
        from lit_align.sharding import gathered_parameters

        if self.generate:
            tokenizer = pl_module.tokenizer
            prompt = tokenizer(PROMPT, return_tensors="pt").to(pl_module.device)
            with gathered_parameters(pl_module.policy) as model, torch.no_grad():
                was_training = model.training
                model.eval()
                out = model.generate(**prompt, max_new_tokens=4 + 3 * trainer.global_rank, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                model.train(was_training)
            self.result["generated"] = out[0].tolist()
        self.result["global_step"] = trainer.global_step
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.result, indent=1))


def sharding_report(model: torch.nn.Module, world: int) -> dict:
    from torch.distributed.tensor import DTensor

    from lit_align.sharding import fsdp_units

    params = dict(model.named_parameters())
    dtensors = {n: p for n, p in params.items() if isinstance(p, DTensor)}
    even = {n: p for n, p in dtensors.items() if p.shape[0] % world == 0}
    not_split = [
        n for n, p in even.items()
        if p.to_local().shape[0] * world != p.shape[0] or p.to_local().shape[1:] != p.shape[1:]
    ]
    # a unit is one FSDP state; fully_shard([a, b]) gives a and b the same state
    groups: dict[int, list] = {}
    for unit in fsdp_units(model):
        groups.setdefault(id(unit._get_fsdp_state()), []).append(unit)
    mixed = []
    for members in groups.values():
        inner = {id(p) for m in members for u in fsdp_units(m) if u not in members for p in u.parameters()}
        own = [p for m in members for p in m.parameters() if id(p) not in inner]
        if len({p.requires_grad for p in own}) > 1:
            mixed.append([type(m).__name__ for m in members])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "activation_checkpointing": bool(getattr(base, "is_activation_checkpointing", False)),
        "num_params": len(params),
        "num_dtensor": len(dtensors),
        "num_trainable": sum(p.requires_grad for p in params.values()),
        "not_split_in_world_parts": not_split,
        "uneven_dim0": sorted(set(dtensors) - set(even)),  # e.g. a [1, h] score head: FSDP2 pads it
        "units": len(groups),
        "mixed_units": mixed,
    }
