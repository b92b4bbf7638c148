"""Where a GRPO step's time goes: cProfile (Python) or torch.profiler (ops) over lit_align's
GRPOModule steps inside `Trainer.fit`, the set-up of bench.grpo (llama-1m, G = 4, 32 new tokens).

    python -m bench.profile_grpo --config llama-1m [--steps 10] [--rows 40] [--torch]

Only the steps after --warmup are profiled, from `on_train_batch_start` to `on_train_batch_end`
(what bench.grpo times). The first table is by cumulative time (the phases: `sample`, `score`,
`advantages`, `optimisation_step`, `log`), the second by own time (the hot spots).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench import dpo, grpo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1m", choices=["llama-1m", "llama-30m"])
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=40, help="table rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--torch", action="store_true", help="torch.profiler's op table instead of cProfile")
    parser.add_argument("--out", help="also save cProfile's stats here (for pstats / snakeviz)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    import lightning as L

    with tempfile.TemporaryDirectory() as tmp:
        path = dpo.model_dir(a.config, Path(tmp))
        module, data, make_trainer = grpo.lit_side(path, a.warmup + a.steps, a.max_prompt)
        profiler = profile(activities=[ProfilerActivity.CPU]) if a.torch else cProfile.Profile()
        times = []

        class Window(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.on = batch_idx >= a.warmup
                if self.on:
                    profiler.__enter__() if a.torch and batch_idx == a.warmup else None
                    profiler.enable() if not a.torch else None
                self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if self.on:
                    times.append(time.perf_counter() - self.start)
                    profiler.disable() if not a.torch else None
                    if a.torch and batch_idx == a.warmup + a.steps - 1:
                        profiler.__exit__(None, None, None)

        make_trainer([Window()]).fit(module, datamodule=data)
    times.sort()
    print(f"\n=== lit_align GRPO step ({a.config}): median {times[len(times) // 2]:.4f} s over {len(times)} profiled steps ===")
    if a.torch:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
        return
    stats = pstats.Stats(profiler)
    if a.out:
        stats.dump_stats(a.out)
    stats.sort_stats("cumulative").print_stats(a.rows)
    stats.sort_stats("tottime").print_stats(a.rows)


if __name__ == "__main__":
    main()
