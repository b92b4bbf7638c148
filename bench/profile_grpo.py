"""Where a GRPO step's time goes: cProfile (Python) or torch.profiler (ops) over lit_align's
GRPOModule steps inside `Trainer.fit`, the set-up of bench.grpo (llama-1m, G = 4, 32 new tokens).

    python -m bench.profile_grpo --config llama-1m [--steps 10] [--rows 40] [--torch | --phases]

Only the steps after --warmup are profiled, from `on_train_batch_start` to `on_train_batch_end`
(what bench.grpo times). cProfile (default): a table by cumulative time (the phases: `sample`,
`score`, `advantages`, `optimisation_step`, `log`), then one by own time (the hot spots).
--phases: wall time per step in each phase, without a profiler's overhead (phases nest: the
decode forwards and the prefill are part of `sample`, the loss forward part of `fwd+bwd`).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
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
    parser.add_argument("--phases", action="store_true", help="wall time per phase instead of a profiler")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    import lightning as L

    phases = time_phases() if a.phases else None
    with tempfile.TemporaryDirectory() as tmp:
        path = dpo.model_dir(a.config, Path(tmp))
        module, data, make_trainer = grpo.lit_side(path, a.warmup + a.steps, a.max_prompt)
        profiler = profile(activities=[ProfilerActivity.CPU]) if a.torch else cProfile.Profile()
        if a.phases:
            profiler = cProfile.Profile()  # never enabled: only the phase timers run
            a.torch = False
        times = []

        class Window(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.on = batch_idx >= a.warmup
                if batch_idx == a.warmup and phases is not None:
                    phases.clear()
                if self.on and phases is None:
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
    if phases is not None:
        total = sum(times)
        for name, spent in sorted(phases.items(), key=lambda x: -x[1]):
            print(f"{name:16s} {1000 * spent / len(times):7.1f} ms/step  {100 * spent / total:5.1f} %")
        return
    if a.torch:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
        return
    stats = pstats.Stats(profiler)
    if a.out:
        stats.dump_stats(a.out)
    stats.sort_stats("cumulative").print_stats(a.rows)
    stats.sort_stats("tottime").print_stats(a.rows)


def time_phases() -> dict:
    """Wrap the step's phases with wall-clock timers; returns the running totals (s) by phase."""
    import lightning as L

    from lit_align.generation import decoder, lean
    from lit_align.modules.grpo import GRPOModule

    totals = collections.defaultdict(float)

    def wrap(owner, name, label):
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    for owner, name, label in [
        (GRPOModule, "sample", "sample"), (decoder.Decoder, "__call__", "decode forwards"), (lean, "prefill", "prefill"),
        (GRPOModule, "score", "rewards"), (GRPOModule, "advantages", "advantages"),
        (GRPOModule, "frozen_logps", "old/ref logps"), (GRPOModule, "optimisation_step", "optimiser step"),
        (GRPOModule, "accumulate_gradients", "fwd+bwd"), (GRPOModule, "token_logps", "loss forward"),
        (L.LightningModule, "log", "self.log"),
    ]:
        wrap(owner, name, label)
    return totals


if __name__ == "__main__":
    main()
