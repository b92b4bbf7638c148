"""Where a DPO step's time goes: torch.profiler tables for lit_align's and TRL's step on one batch.

    python -m bench.profile_dpo --config llama-1m [--steps 2] [--rows 20]

lit_align's step here is `DPOModule.compute_loss` + backward + AdamW step (no Lightning loop, so
the loop's own overhead shows as the difference to bench.dpo); TRL's is `training_step` + AdamW
step. For Python-level hot spots run py-spy on it: `py-spy record -o prof.svg -- python -m bench.profile_dpo`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench import dpo, harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1m", choices=dpo.CONFIGS)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per side (after one warm-up)")
    parser.add_argument("--rows", type=int, default=20, help="table rows")
    parser.add_argument("--side", default="both", choices=["both", "lit_align", "trl"])
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = dpo.model_dir(a.config, work)
        module, data, _ = dpo.lit_side(a.config, path, a.steps + 1)
        module.configure_model()
        data.tokenizer = module.tokenizer
        data.setup("fit")
        optimizer = module.configure_optimizers()
        batches = [data.collator()(data.train_set[i * dpo.BATCH : (i + 1) * dpo.BATCH]) for i in range(a.steps + 1)]

        def lit_step(batch):
            loss, _ = module.compute_loss(batch, "train")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        sides = {"lit_align": (lambda b: lit_step(b))}
        if a.side in ("both", "trl"):
            _, collate, trl_step = dpo.trl_side(a.config, path, work)
            sides["trl"] = lambda b: trl_step(collate(data.train_set[int(b["index"][0]) : int(b["index"][0]) + dpo.BATCH]))
        if a.side == "trl":
            sides.pop("lit_align")
        for name, step in sides.items():
            step(batches[0])
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                for b in batches[1:]:
                    step(b)
            print(f"\n=== {name}: {(time.perf_counter() - start) / a.steps:.3f} s/step (profiled) ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
