"""DPO step: lit_align (Lightning `Trainer.fit` on AlignDataModule) vs TRL's `DPOTrainer.training_step`.

    python -m bench.dpo                      # llama-1m, llama-30m, smollm2-lora at <= 256 tokens (slow on a CPU)
    python -m bench.dpo --configs llama-1m --baseline   # also time the padded forward (packing=False)
    python -m bench.dpo --configs llama-30m --max-prompt 32 --max-completion 32
    python -m bench.dpo --quick              # smoke run: llama-1m, 5 steps, <= 64 + 64 tokens

Both sides get identical weights (one saved directory), identical tokens (lit_align's encoded
HH-RLHF pairs; TRL pads them with its own `DataCollatorForPreference`) and the same batches in the
same order, float32, no gradient checkpointing, AdamW(lr=1e-6, weight_decay=0), a frozen reference
copy (full fine-tuning) or the adapter-disabled base (LoRA).

What one timed step includes:
* lit_align: from the moment Lightning hands the collated batch to the DataModule
  (`on_before_batch_transfer`) to `on_train_batch_end` inside `Trainer.fit`: the batch transfer
  and the DataModule's re-ranking hook (`on_after_batch_transfer`; no re-ranker is configured
  here, bench.rerank times one), forward of policy and reference, loss, `self.log` of TRL's
  metrics, backward, `optimizer.step()`, `zero_grad`.
* TRL: `trainer.training_step(model, inputs)` (input preparation, policy and reference forwards,
  loss, its metrics, backward) + `optimizer.step()` + `zero_grad` on the batch its collator built.
Collation is outside both windows. The order alternates ABBA (TRL then lit_align on even
batches, lit_align then TRL on odd ones), so that neither side always runs first (warm caches,
the allocator's state) and machine load hits both alike. Peak RSS is measured for each side
alone in a fresh process running the same steps.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import harness

CONFIGS = ("llama-1m", "llama-30m", "smollm2-lora")
BATCH, MAX_PROMPT, MAX_COMPLETION = 8, 128, 128  # 8 pairs, <= 256 tokens per sequence (--max-prompt/--max-completion)
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


def model_dir(config: str, work: Path) -> Path:
    if config == "smollm2-lora":
        from lit_align.models import smollm2_dir

        return smollm2_dir()
    return harness.make_llama(config, work / config)


# ---------------------------------------------------------------------------- the two sides
def lit_side(config: str, path: Path, n_steps: int, packing: bool = True, data_class=None):
    """DPOModule + AlignDataModule (or `data_class`) + a Lightning Trainer for `n_steps` steps
    (batch size, lengths: module globals)."""
    from lit_align.data.datamodule import AlignDataModule
    from lit_align.models import LoraArgs, PolicyConfig
    from lit_align.modules.dpo import DPOModule

    lora = LoraArgs(**LORA) if config == "smollm2-lora" else None
    module = DPOModule(
        PolicyConfig(name_or_path=str(path), lora=lora),
        beta=0.1,
        reference="lora_base" if lora else "copy",
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0),
        packing=packing,
    )
    data = (data_class or AlignDataModule)(
        path=str(harness.require_data()),
        format="hh_rlhf",
        on_bad_rows="skip",
        limit=n_steps * BATCH + 16,
        val_fraction=0.0,
        shuffle=False,
        batch_size=BATCH,
        max_prompt_length=MAX_PROMPT,
        max_completion_length=MAX_COMPLETION,
    )

    return module, data, functools.partial(harness.bench_trainer, n_steps)


def trl_side(config: str, path: Path, work: Path):
    """A DPOTrainer on the same weights; returns (trainer, step(examples) -> None)."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_config = None
    if config == "smollm2-lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    args = trl.DPOConfig(
        output_dir=str(work / "trl"),
        beta=0.1,
        loss_type=["sigmoid"],
        per_device_train_batch_size=BATCH,
        max_length=None,
        dataloader_num_workers=0,
        **harness.trl_cpu_args(),
    )
    dummy = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})  # batches come from our rows
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tokenizer, peft_config=peft_config)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop; training_step divides by it

    def collate(examples):
        return trainer.data_collator([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples])

    def step(inputs):
        trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return trainer, collate, step


# ---------------------------------------------------------------------------- workers
def timed_data_class():
    """AlignDataModule that calls `before_transfer(batch)` when Lightning hands it a collated
    batch, before the batch transfer and the re-ranking hook: where lit_align's window opens."""
    from lit_align.data.datamodule import AlignDataModule

    class TimedData(AlignDataModule):
        before_transfer = None

        def on_before_batch_transfer(self, batch, dataloader_idx):
            if self.before_transfer is not None:
                self.before_transfer(batch)
            return super().on_before_batch_transfer(batch, dataloader_idx)

    return TimedData


def padded_stepper(config: str, path: Path, n_steps: int):
    """The padded forward (packing=False), stepped by hand on the same batches."""
    padded, _, _ = lit_side(config, path, n_steps, packing=False)
    padded.configure_model()
    optimizer = padded.configure_optimizers()

    def step(batch):
        loss, _ = padded.compute_loss(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_worker(config: str, steps: int, warmup: int, work: Path, baseline: bool = False) -> dict:
    """One process, both sides, ABBA on the same batches; FLOPs counted on the last warm-up step."""
    import lightning as L
    from torch.utils.flop_counter import FlopCounterMode

    path = model_dir(config, work)
    module, data, make_trainer = lit_side(config, path, warmup + steps, data_class=timed_data_class())
    trl_trainer, trl_collate, trl_step = trl_side(config, path, work)
    padded_step = padded_stepper(config, path, warmup + steps) if baseline else None
    watch = harness.Stopwatch()
    counts: dict = {"real_tokens": [], "padded_tokens": [], "trl_first": 0}
    state = {"i": 0}

    def others(batch, i):
        """TRL's step (and the padded baseline) on the same batch, outside lit_align's window."""
        inputs = trl_collate([data.train_set[j] for j in batch["index"].tolist()])
        if i == warmup - 1:
            counts["trl_flops"], _ = harness.flops_of(lambda: trl_step(inputs))
        else:
            watch.time("trl", lambda: trl_step(inputs), record=i >= warmup)
        if padded_step is not None:
            watch.time("lit_align_padded", lambda: padded_step(batch), record=i >= warmup)

    def before_transfer(batch):
        i = state["i"]
        if i % 2 == 0:  # A B: TRL first
            others(batch, i)
            counts["trl_first"] += i >= warmup
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        if i >= warmup:
            counts["real_tokens"].append(int(mask.sum()))
            counts["padded_tokens"].append(mask.numel())
        state["counter"] = FlopCounterMode(display=False) if i == warmup - 1 else None
        if state["counter"] is not None:
            state["counter"].__enter__()
        state["batch"], state["start"] = batch, time.perf_counter()

    class WindowEnd(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            elapsed, i = time.perf_counter() - state["start"], state["i"]
            if state["counter"] is not None:
                state["counter"].__exit__(None, None, None)
                counts["lit_flops"] = state["counter"].get_total_flops()
            if i >= warmup:
                watch.add("lit_align", elapsed)
            if i % 2 == 1:  # B A: lit_align first, then TRL
                others(state["batch"], i)
            state["i"] += 1

    data.before_transfer = before_transfer
    make_trainer([WindowEnd()]).fit(module, datamodule=data)
    return summarise_timing(config, steps, warmup, module, watch, counts)


def summarise_timing(config: str, steps: int, warmup: int, module, watch, counts: dict) -> dict:
    peak = harness.matmul_peak()
    out = {"config": config, "steps": steps, "warmup": warmup, "matmul": peak, **harness.count_params(module.policy)}
    out["order"] = f"ABBA: TRL first on {counts['trl_first']} of {steps} timed steps, lit_align first on the rest"
    out["lit_align_window"] = "on_before_batch_transfer -> on_train_batch_end (re-ranking hook inside)"
    real = statistics.median(counts["real_tokens"])
    for side in watch.times:
        s = watch.summary(side)
        s["tokens_per_s"] = real / s["median_s"]
        flops = counts.get({"lit_align": "lit_flops", "trl": "trl_flops"}.get(side, ""))
        if flops:
            s["step_flops"] = flops
            s["achieved_flops"] = flops / s["median_s"]
            s["fraction_of_matmul_peak"] = s["achieved_flops"] / peak["peak_flops"]
        out[side] = s
    out["real_tokens_per_step"] = real
    out["padding_fraction"] = 1 - sum(counts["real_tokens"]) / sum(counts["padded_tokens"])
    out["speedup_vs_trl"] = out["trl"]["median_s"] / out["lit_align"]["median_s"]
    return out


def rss_worker(config: str, side: str, steps: int, work: Path) -> dict:
    """Peak RSS of one side alone: load, then `steps` training steps."""
    path = model_dir(config, work)
    if side == "lit_align":
        module, data, make_trainer = lit_side(config, path, steps)
        make_trainer([]).fit(module, datamodule=data)
    else:
        from lit_align.data.datamodule import AlignDataModule
        from lit_align.models import PolicyConfig, load_tokenizer

        data = AlignDataModule(
            path=str(harness.require_data()), format="hh_rlhf", on_bad_rows="skip", limit=steps * BATCH + 16,
            val_fraction=0.0, shuffle=False, batch_size=BATCH, max_prompt_length=MAX_PROMPT,
            max_completion_length=MAX_COMPLETION,
        )
        data.tokenizer = load_tokenizer(PolicyConfig(name_or_path=str(path)))
        data.setup("fit")
        _, collate, step = trl_side(config, path, work)
        for i in range(steps):
            step(collate(data.train_set[i * BATCH : (i + 1) * BATCH]))
    return {"config": config, "side": side, "steps": steps, "peak_rss_mb": harness.peak_rss_mb()}


# ---------------------------------------------------------------------------- driver
def main() -> None:
    global BATCH, MAX_PROMPT, MAX_COMPLETION
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, help="timed steps per side, median (default 10; --quick 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rss-steps", type=int, help="steps before reading peak RSS (default 3; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="5 steps, llama-1m, <= 64+64 tokens (a smoke run)")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="also time lit_align's padded forward (packing=False)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--max-prompt", type=int, default=MAX_PROMPT)
    parser.add_argument("--max-completion", type=int, default=MAX_COMPLETION)
    parser.add_argument("--worker", choices=["time", "rss"], help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    a.steps = a.steps if a.steps is not None else (5 if a.quick else 10)
    a.rss_steps = a.rss_steps if a.rss_steps is not None else (2 if a.quick else 3)
    if a.quick:
        a.max_prompt, a.max_completion = min(a.max_prompt, 64), min(a.max_completion, 64)
        if a.configs == ",".join(CONFIGS):
            a.configs = "llama-1m"
    BATCH, MAX_PROMPT, MAX_COMPLETION = a.batch, a.max_prompt, a.max_completion
    if a.worker:
        work = Path(a.work)
        if a.worker == "time":
            harness.print_result(time_worker(a.configs, a.steps, a.warmup, work, a.baseline))
        else:
            harness.print_result(rss_worker(a.configs, a.side, a.rss_steps, work))
        return

    info = harness.machine()
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for config in a.configs.split(","):
            common = ["--configs", config, "--work", tmp, "--threads", str(a.threads), "--batch", str(a.batch)]
            common += ["--max-prompt", str(a.max_prompt), "--max-completion", str(a.max_completion)]
            timing_args = ["--worker", "time", "--steps", str(a.steps), "--warmup", str(a.warmup), *common]
            timing = harness.run_isolated("bench.dpo", timing_args + (["--baseline"] if a.baseline else []))
            if not a.no_rss:
                for side in ("lit_align", "trl"):
                    rss = harness.run_isolated("bench.dpo", ["--worker", "rss", "--side", side, "--rss-steps", str(a.rss_steps), *common])
                    timing[side]["peak_rss_mb"] = rss["peak_rss_mb"]
            results.append(timing)
            for side in [k for k in ("lit_align", "lit_align_padded", "trl") if k in timing]:
                s = timing[side]
                rows.append(
                    {
                        "config": config,
                        "side": side,
                        "params": timing["params"],
                        "step s (median)": s["median_s"],
                        "real tok/s": s["tokens_per_s"],
                        "speedup vs TRL": timing["trl"]["median_s"] / s["median_s"],
                        "peak RSS MB": s.get("peak_rss_mb"),
                        "GFLOP/step": s["step_flops"] / 1e9 if "step_flops" in s else None,
                        "GFLOP/s": s["achieved_flops"] / 1e9 if "step_flops" in s else None,
                        "% matmul peak": 100 * s["fraction_of_matmul_peak"] if "step_flops" in s else None,
                        "padding %": 100 * timing["padding_fraction"],
                    }
                )
            print(f"{config}: lit_align {timing['lit_align']['median_s']:.3f}s  trl {timing['trl']['median_s']:.3f}s", flush=True)
    columns = list(rows[0]) if rows else []
    name = ("dpo" if a.configs == ",".join(CONFIGS) else "dpo_" + a.configs.replace(",", "_")) + ("_quick" if a.quick else "")
    harness.report(name, {"machine": info, "args": vars(a), "results": results}, rows, columns)


if __name__ == "__main__":
    main()
