"""GRPO step: lit_align's GRPOModule (Lightning `Trainer.fit`) vs TRL's `GRPOTrainer.training_step`.

    python -m bench.grpo                        # llama-1m, G = 4, 32 new tokens, 2 prompts per step
    python -m bench.grpo --config llama-30m --steps 10

Identical weights, the same real HH-RLHF prompts (only prompts shorter than --max-prompt tokens,
so neither side truncates), G = 4 completions of at most 32 new tokens sampled at temperature 1
by each side's default sampler (lit_align: `lit_align.generation.lean`, TRL: transformers `generate`),
the same plain-Python reward function, loss "dapo", β = 0 (no
reference model; both libraries' default), float32, no gradient checkpointing, AdamW(lr=1e-6,
weight_decay=0), gradient-norm clipping at 1.0.

One timed step:
* lit_align: `on_train_batch_start` -> `on_train_batch_end` of `Trainer.fit` (sampling, rewards,
  advantages, old/ref log-probs when needed, loss, backward, clip, optimizer step, logging).
* TRL: `trainer.training_step(model, rows)` (its `_generate_and_score_completions`: sampling,
  rewards, advantages; then loss and backward) + clip + `optimizer.step()` + `zero_grad`.
The order alternates ABBA (TRL then lit_align on even batches, lit_align then TRL on odd ones).
The two sides sample different completions, so besides time per step the JSON reports time per
generated token (completion tokens up to and including EOS, from each side's own
`completions/mean_length` of that step): the step time divided by that step's tokens, median over
the timed steps, and its ratio. The random models rarely emit EOS, so both sides mostly generate
the full 32 tokens per completion.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import dpo, harness

G, NEW_TOKENS, PROMPTS = 4, 32, 2


def length_reward(prompts, completions, **columns) -> list[float]:
    """Prefers completions of about 60 characters (any cheap deterministic reward works here)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [-abs(len(t) - 60) / 60 for t in texts]


def lit_side(path: Path, n_steps: int, max_prompt: int):
    from lit_align.data.datamodule import AlignDataModule
    from lit_align.models import PolicyConfig
    from lit_align.modules.grpo import GRPOModule
    from lit_align.modules.grpo_config import GRPOLossConfig, GRPOSamplingConfig

    module = GRPOModule(
        PolicyConfig(name_or_path=str(path)),
        reward_funcs=[length_reward],
        sampling=GRPOSamplingConfig(num_generations=G, max_new_tokens=NEW_TOKENS),
        loss=GRPOLossConfig(loss_type="dapo", beta=0.0),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0),
    )
    data = AlignDataModule(
        path=str(harness.require_data()),
        mode="prompts",
        format="hh_rlhf",
        on_bad_rows="skip",
        limit=20 * n_steps * PROMPTS + 64,
        val_fraction=0.0,
        shuffle=False,
        batch_size=PROMPTS,
        max_prompt_length=None,
    )
    data.tokenizer = module.tokenizer
    data.setup("fit")
    data.train_set = [e for e in data.train_set if len(e["prompt_ids"]) <= max_prompt][: n_steps * PROMPTS]
    if len(data.train_set) < n_steps * PROMPTS:
        raise SystemExit(f"only {len(data.train_set)} prompts of <= {max_prompt} tokens; raise --max-prompt")

    return module, data, functools.partial(harness.bench_trainer, n_steps)


def trl_side(path: Path, work: Path):
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = trl.GRPOConfig(
        output_dir=str(work / "trl_grpo"),
        num_generations=G,
        max_completion_length=NEW_TOKENS,
        per_device_train_batch_size=G * PROMPTS,
        loss_type="dapo",
        beta=0.0,
        temperature=1.0,
        log_completions=False,
        **harness.trl_cpu_args(),
    )
    dummy = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]] * (G * PROMPTS)})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=dummy, processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1

    def step(rows):
        trainer.training_step(trainer.model, rows, None)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return trainer, step


def time_worker(config: str, steps: int, warmup: int, max_prompt: int, work: Path) -> dict:
    import lightning as L

    path = dpo.model_dir(config, work)
    module, data, make_trainer = lit_side(path, warmup + steps, max_prompt)
    trl_trainer, trl_step = trl_side(path, work)
    watch = harness.Stopwatch()
    tokens: dict = {"lit_align": [], "trl": []}

    def trl(batch, record: bool) -> None:
        rows = [{"prompt": p} for p in batch["prompt"] for _ in range(G)]  # TRL's RepeatSampler order
        watch.time("trl", lambda: trl_step(rows), record=record)
        if record:  # TRL appends one completions/mean_length per step
            tokens["trl"].append(trl_trainer._metrics["train"]["completions/mean_length"][-1] * len(rows))

    class ABBA(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.record = batch_idx >= warmup
            if batch_idx % 2 == 0:  # A B: TRL first
                trl(batch, self.record)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            elapsed = time.perf_counter() - self.start
            if self.record:
                watch.add("lit_align", elapsed)
                n = len(batch["prompt"]) * G
                tokens["lit_align"].append(float(trainer.callback_metrics["completions/mean_length"]) * n)
            if batch_idx % 2 == 1:  # B A: lit_align first
                trl(batch, self.record)

    make_trainer([ABBA()]).fit(module, datamodule=data)
    out = {"config": config, "steps": steps, "warmup": warmup, **harness.count_params(module.policy)}
    out["order"] = "ABBA: TRL first on even batches, lit_align first on odd ones"
    for side in ("lit_align", "trl"):
        out[side] = watch.summary(side)
        per_token = [t / n for t, n in zip(watch.times[side], tokens[side])]
        out[side]["generated_tokens_per_step_median"] = statistics.median(tokens[side])
        out[side]["median_s_per_generated_token"] = statistics.median(per_token)
    out["trl_mean_completion_length"] = statistics.mean(tokens["trl"]) / (G * PROMPTS)
    out["lit_align_mean_completion_length"] = statistics.mean(tokens["lit_align"]) / (G * PROMPTS)
    out["time_ratio_lit_over_trl"] = out["lit_align"]["median_s"] / out["trl"]["median_s"]
    out["per_token_time_ratio_lit_over_trl"] = (
        out["lit_align"]["median_s_per_generated_token"] / out["trl"]["median_s_per_generated_token"]
    )
    return out


def rss_worker(config: str, side: str, steps: int, max_prompt: int, work: Path) -> dict:
    path = dpo.model_dir(config, work)
    module, data, make_trainer = lit_side(path, steps, max_prompt)
    if side == "lit_align":
        make_trainer([]).fit(module, datamodule=data)
    else:
        _, step = trl_side(path, work)
        for i in range(steps):
            step([{"prompt": e["prompt"]} for e in data.train_set[i * PROMPTS : (i + 1) * PROMPTS] for _ in range(G)])
    return {"config": config, "side": side, "peak_rss_mb": harness.peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1m", choices=["llama-1m", "llama-30m"])
    parser.add_argument("--steps", type=int, help="timed steps (default 10; --quick 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--rss-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5 steps (a smoke run)")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--worker", choices=["time", "rss"], help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    a.steps = a.steps if a.steps is not None else (5 if a.quick else 10)
    if a.worker == "time":
        harness.print_result(time_worker(a.config, a.steps, a.warmup, a.max_prompt, Path(a.work)))
        return
    if a.worker == "rss":
        harness.print_result(rss_worker(a.config, a.side, a.rss_steps, a.max_prompt, Path(a.work)))
        return
    info = harness.machine()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--config", a.config, "--work", tmp, "--threads", str(a.threads), "--max-prompt", str(a.max_prompt)]
        result = harness.run_isolated("bench.grpo", ["--worker", "time", "--steps", str(a.steps), "--warmup", str(a.warmup), *common])
        if not a.no_rss:
            for side in ("lit_align", "trl"):
                rss = harness.run_isolated("bench.grpo", ["--worker", "rss", "--side", side, "--rss-steps", str(a.rss_steps), *common])
                result[side]["peak_rss_mb"] = rss["peak_rss_mb"]
    rows = [
        {
            "config": a.config,
            "side": side,
            "step s (median)": result[side]["median_s"],
            "time vs TRL": result[side]["median_s"] / result["trl"]["median_s"],
            "tokens/step": result[side]["generated_tokens_per_step_median"],
            "ms/token": 1000 * result[side]["median_s_per_generated_token"],
            "per-token vs TRL": result[side]["median_s_per_generated_token"] / result["trl"]["median_s_per_generated_token"],
            "peak RSS MB": result[side].get("peak_rss_mb"),
        }
        for side in ("lit_align", "trl")
    ]
    harness.report(f"grpo_{a.config}" + ("_quick" if a.quick else ""), {"machine": info, "args": vars(a), **result}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
