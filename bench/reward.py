"""Reward-model step: lit_align's RewardModule (Lightning `Trainer.fit`) vs TRL's `RewardTrainer.training_step`.

    python -m bench.reward                      # llama-1m and llama-30m, batch 8 pairs, <= 256 tokens
    python -m bench.reward --configs llama-1m --steps 10
    python -m bench.reward --baseline           # also time RewardModule's padded forward (packing=False)

Same backbone weights (a sequence-classification head with one label on the saved random Llama;
the freshly initialised head differs between the sides, which does not change the work), the
same tokens (lit_align's encoded HH-RLHF pairs; TRL pads prompt+chosen / prompt+rejected with its
own `DataCollatorForPreference`), Bradley–Terry loss without margin or centering, float32, no
gradient checkpointing, AdamW(lr=1e-6, weight_decay=0).

One timed step: lit_align from `on_train_batch_start` to `on_train_batch_end` in `Trainer.fit`
(forward of chosen+rejected, loss, metrics, backward, optimizer step); TRL
`trainer.training_step(model, inputs)` + `optimizer.step()` + `zero_grad`. Alternating per batch.
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

DEFAULT_CONFIGS = "llama-1m,llama-30m"


def lit_side(path: Path, n_steps: int, packing: bool = True):
    from lit_align.data.datamodule import AlignDataModule
    from lit_align.models import PolicyConfig
    from lit_align.modules.reward import RewardModule

    module = RewardModule(
        PolicyConfig(name_or_path=str(path)), packing=packing,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0),
    )
    data = AlignDataModule(
        path=str(harness.require_data()), format="hh_rlhf", on_bad_rows="skip", limit=n_steps * dpo.BATCH + 16,
        val_fraction=0.0, shuffle=False, batch_size=dpo.BATCH, max_prompt_length=dpo.MAX_PROMPT,
        max_completion_length=dpo.MAX_COMPLETION,
    )

    return module, data, functools.partial(harness.bench_trainer, n_steps)


def trl_side(path: Path, work: Path):
    import trl
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(path)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
    args = trl.RewardConfig(
        output_dir=str(work / "trl_reward"), per_device_train_batch_size=dpo.BATCH, max_length=None,
        **harness.trl_cpu_args(),
    )
    dummy = Dataset.from_dict({"chosen": ["a b"], "rejected": ["a c"]})  # batches come from our rows
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dummy, processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1

    def collate(examples):
        return trainer.data_collator(
            [{"chosen_ids": e["prompt_ids"] + e["chosen_ids"], "rejected_ids": e["prompt_ids"] + e["rejected_ids"]} for e in examples]
        )

    def step(inputs):
        trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return collate, step


def time_worker(config: str, steps: int, warmup: int, work: Path, baseline: bool = False) -> dict:
    import lightning as L

    path = dpo.model_dir(config, work)
    module, data, make_trainer = lit_side(path, warmup + steps)
    trl_collate, trl_step = trl_side(path, work)
    padded_step = None
    if baseline:  # the padded forward (packing=False), stepped by hand on the same batches
        padded, _, _ = lit_side(path, warmup + steps, packing=False)
        padded.configure_model()
        padded_optimizer = padded.configure_optimizers()

        def padded_step(batch):
            padded.compute_loss(batch)[0].backward()
            padded_optimizer.step()
            padded_optimizer.zero_grad(set_to_none=True)

    watch, tokens = harness.Stopwatch(), []

    class ABAB(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            inputs = trl_collate([data.train_set[i] for i in batch["index"].tolist()])
            self.record = batch_idx >= warmup
            watch.time("trl", lambda: trl_step(inputs), record=self.record)
            if padded_step is not None:
                watch.time("lit_align_padded", lambda: padded_step(batch), record=self.record)
            if self.record:
                tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.record:
                watch.add("lit_align", time.perf_counter() - self.start)

    make_trainer([ABAB()]).fit(module, datamodule=data)
    out = {"config": config, "steps": steps, "warmup": warmup, **harness.count_params(module.model)}
    for side in watch.times:
        out[side] = watch.summary(side)
        out[side]["tokens_per_s"] = statistics.median(tokens) / out[side]["median_s"]
    out["speedup_vs_trl"] = out["trl"]["median_s"] / out["lit_align"]["median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-prompt", type=int, default=dpo.MAX_PROMPT)
    parser.add_argument("--max-completion", type=int, default=dpo.MAX_COMPLETION)
    parser.add_argument("--quick", action="store_true", help="5 steps, llama-1m")
    parser.add_argument("--baseline", action="store_true", help="also time the padded forward (packing=False)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    dpo.MAX_PROMPT, dpo.MAX_COMPLETION = a.max_prompt, a.max_completion
    if a.quick:
        a.steps, a.configs = 5, "llama-1m"
    if a.worker:
        harness.print_result(time_worker(a.configs, a.steps, a.warmup, Path(a.work), a.baseline))
        return
    info, results, rows = harness.machine(), [], []
    with tempfile.TemporaryDirectory() as tmp:
        for config in a.configs.split(","):
            args = ["--worker", "--configs", config, "--work", tmp, "--steps", str(a.steps), "--warmup", str(a.warmup)]
            args += ["--threads", str(a.threads), "--max-prompt", str(a.max_prompt), "--max-completion", str(a.max_completion)]
            r = harness.run_isolated("bench.reward", args + (["--baseline"] if a.baseline else []))
            results.append(r)
            for side in [k for k in ("lit_align", "lit_align_padded", "trl") if k in r]:
                rows.append({"config": config, "side": side, "step s (median)": r[side]["median_s"],
                             "real tok/s": r[side]["tokens_per_s"], "speedup vs TRL": r["trl"]["median_s"] / r[side]["median_s"]})
    name = ("reward" if a.configs == DEFAULT_CONFIGS else "reward_" + a.configs.replace(",", "_")) + ("_quick" if a.quick else "")
    harness.report(name, {"machine": info, "args": vars(a), "results": results}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
