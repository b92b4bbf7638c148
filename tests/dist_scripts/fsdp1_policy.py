"""DecoderBlockWrapPolicy under FSDP v1 on 2 CPU processes (gloo), launched with torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_scripts/fsdp1_policy.py MODEL_DIR OUT.json

Lightning's FSDPStrategy is CUDA-only in lit_align (configs/strategy/fsdp.yaml), but torch's
FullyShardedDataParallel itself runs on CPU, so the wrap policy is checked here directly: a LoRA
policy and a frozen reference in one module, as a DPO LightningModule holds them.
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from lit_align.models import LoraArgs, PolicyConfig, load_causal_lm
from lit_align.sharding import DecoderBlockWrapPolicy


class PolicyAndReference(torch.nn.Module):
    def __init__(self, model_dir: str):
        super().__init__()
        torch.manual_seed(0)
        self.policy = load_causal_lm(PolicyConfig(name_or_path=model_dir, lora=LoraArgs(r=4, target_modules=["q_proj"])))
        self.reference = load_causal_lm(PolicyConfig(name_or_path=model_dir)).requires_grad_(False)

    def forward(self, ids):
        with torch.no_grad():
            self.reference(input_ids=ids)
        return self.policy(input_ids=ids, labels=ids).loss


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    wrapped = FSDP(PolicyAndReference(model_dir), auto_wrap_policy=DecoderBlockWrapPolicy(), use_orig_params=True,
                   device_id=torch.device("cpu"))
    units = {name: module for name, module in wrapped.named_modules() if isinstance(module, FSDP)}
    loss = wrapped(torch.tensor([[5, 6, 7, 8, 9]]))
    loss.backward()
    grads = [n for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is not None]
    if dist.get_rank() == 0:
        result = {
            "units": sorted(n.replace("_fsdp_wrapped_module.", "") for n in units),
            "mixed_units": [n for n, u in units.items() if len({p.requires_grad for p in u.params}) > 1],
            "loss": float(loss),
            "params_with_grad": len(grads),
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
