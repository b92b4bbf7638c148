"""FSDP2 on a tiny HF model through Lightning's ModelParallelStrategy (run by tests/test_distributed.py).

    python tests/dist_scripts/fsdp2_tiny.py --model-dir D --out O --devices 2 [--lora]

With --devices 2, Lightning's launcher starts the second process (gloo on CPU). The module is a
plain next-token LM loss on fixed random token rows, so the global-batch loss of a sharded run
must equal the 1-process run's. The run trains two steps, saves a sharded checkpoint, resumes
for two more, checks sharding and unit layout, generates with gathered parameters, and
writes what it saw to O/result_<devices>.json (rank 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_align.models import LoraArgs, PolicyConfig, export_hf, load_causal_lm, load_tokenizer
from lit_align.sharding import FSDP2Strategy, ShardingConfig, fsdp_units, gathered_parameters, shard_model

# One step per epoch on the whole data: Lightning shuffles a distributed run's training sampler,
# so only a batch holding every row is the same global batch in the 1- and 2-process runs.
GLOBAL_BATCH = ROWS = 4
SEQ, EPOCHS_BEFORE_SAVE, EPOCHS = 12, 2, 4
# hyper-parameters hold these dataclasses; resuming reads checkpoints with weights_only=True
torch.serialization.add_safe_globals([PolicyConfig, LoraArgs, ShardingConfig])


class TinyLM(L.LightningModule):
    def __init__(self, policy: PolicyConfig, sharding: ShardingConfig = ShardingConfig()):
        super().__init__()
        self.save_hyperparameters()
        self.policy_cfg, self.sharding = policy, sharding
        self.policy = None

    def configure_model(self):
        if self.policy is not None:
            return
        torch.manual_seed(0)  # same LoRA init on every rank and in the 1-process run
        self.policy = load_causal_lm(self.policy_cfg)
        if self.device_mesh is not None:
            s = self.sharding
            shard_model(self.policy, self.device_mesh, reshard_after_forward=s.reshard_after_forward,
                        mixed_precision=s.mixed_precision, activation_checkpointing=s.activation_checkpointing)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.policy(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, self.policy.config.vocab_size, (ROWS, SEQ), generator=g)
        per_device = GLOBAL_BATCH // self.trainer.world_size
        return DataLoader(TensorDataset(ids), batch_size=per_device, shuffle=False)


class GlobalLoss(L.Callback):
    """Per-step loss averaged over ranks (each rank's mean over an equal share of the batch)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(pl_module.all_gather(outputs["loss"].detach()).mean()))


def sharding_report(module: TinyLM, world: int) -> dict:
    from torch.distributed.tensor import DTensor

    params = dict(module.policy.named_parameters())
    halves = {n: (tuple(p.to_local().shape), tuple(p.shape)) for n, p in params.items() if isinstance(p, DTensor)}
    not_half = [n for n, (loc, glob) in halves.items() if loc[0] * world != glob[0] or loc[1:] != glob[1:]]
    # a unit is one FSDP state; fully_shard([a, b]) gives a and b the same state
    groups: dict[int, list] = {}
    for unit in fsdp_units(module.policy):
        groups.setdefault(id(unit._get_fsdp_state()), []).append(unit)
    mixed = []
    for members in groups.values():
        inner = {id(p) for m in members for u in fsdp_units(m) if u not in members for p in u.parameters()}
        own = [p for m in members for p in m.parameters() if id(p) not in inner]
        if len({p.requires_grad for p in own}) > 1:
            mixed.append([type(m).__name__ for m in members])
    return {"num_params": len(params), "num_dtensor": len(halves), "not_half": not_half,
            "units": len(groups), "mixed_units": mixed}


def save_full(module: TinyLM, policy: PolicyConfig, path: Path, rank: int) -> None:
    """Gather the full weights (a collective) and save them on rank 0, LoRA merged: the expected export."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model = load_causal_lm(policy)
        model.load_state_dict(full)
        export_hf(model, load_tokenizer(policy), path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    lora = LoraArgs(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]) if args.lora else None
    policy = PolicyConfig(name_or_path=args.model_dir, lora=lora)
    distributed = args.devices > 1
    common = dict(accelerator="cpu", devices=args.devices, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, deterministic=True)

    def strategy():
        return FSDP2Strategy() if distributed else "auto"

    # first epochs, then save (sharded directory under FSDP2, a .ckpt file otherwise)
    L.seed_everything(0)
    first, module = GlobalLoss(), TinyLM(policy)
    trainer = L.Trainer(strategy=strategy(), max_epochs=EPOCHS_BEFORE_SAVE, callbacks=[first], **common)
    trainer.fit(module)
    ckpt = out / ("sharded.ckpt" if distributed else "full.ckpt")
    trainer.save_checkpoint(ckpt)
    report = sharding_report(module, trainer.world_size) if distributed else {}
    save_full(module, policy, out / f"saved_{args.devices}", trainer.global_rank)

    # resume into a fresh module for the remaining epochs: needs the restored weights and AdamW state
    second, resumed = GlobalLoss(), TinyLM(policy)
    trainer = L.Trainer(strategy=strategy(), max_epochs=EPOCHS, callbacks=[second], **common)
    trainer.fit(resumed, ckpt_path=ckpt)

    # greedy generation with gathered weights; ranks decode different lengths (would hang if sharded)
    rank = trainer.global_rank
    tokenizer = load_tokenizer(policy)
    prompt = tokenizer("Human: tell me a joke.", return_tensors="pt")
    with gathered_parameters(resumed.policy) as model, torch.no_grad():
        model.eval()
        generated = model.generate(**prompt, max_new_tokens=4 + 3 * rank, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[0].tolist()
    save_full(resumed, policy, out / f"final_{args.devices}", rank)
    if rank == 0:
        result = {"losses": first.losses + second.losses, "steps_before_save": len(first.losses),
                  "global_step": trainer.global_step, "generated": generated, "sharding": report,
                  "checkpoint": str(ckpt)}
        (out / f"result_{args.devices}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
