"""Callbacks that record what a run does, apart from the modules' algorithms.

`CompletionsLogger` writes GRPO's sampled completions: every `every_n_steps` generation batches,
the first `num_completions` (step, prompt, completion, each reward source's reward, advantage)
rows of the batch are appended to `completions.csv` in the run directory (the logger's
`log_dir`, else `trainer.default_root_dir`), and added to TensorBoard as a text table when the
logger is a `TensorBoardLogger`. The shipped GRPO configs add it under `trainer.callbacks`:

    trainer:
      callbacks:
        - class_path: lit_align.CompletionsLogger
          init_args: {every_n_steps: 10, num_completions: 8}

It reads `GRPOModule.training_step`'s output (`{"completions": SampledCompletions}`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from lit_align.checks import ConfigError, check_range


def completion_rows(sampled, limit: int) -> list[dict]:
    """The first `limit` completions of a `SampledCompletions` as table rows."""
    g, rows = sampled.num_generations, []
    for i in range(min(limit, len(sampled.texts))):
        prompt = sampled.prompts[i // g]
        prompt_text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)  # the last (user) turn
        row = {"step": sampled.step, "prompt": prompt_text, "completion": sampled.texts[i]}
        row.update({name: float(sampled.rewards_per_func[i, k]) for k, name in enumerate(sampled.reward_names)})
        row["advantage"] = float(sampled.advantages[i])
        rows.append(row)
    return rows


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append `rows` to a CSV file, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    """`rows` as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r.values()) + " |" for r in rows]
    return "\n".join(lines)


class CompletionsLogger(Callback):
    """Append GRPO's sampled completions to `completions.csv` (and TensorBoard text); see the module docstring.

    Args:
        every_n_steps: Log every n-th generation batch (rollout), starting with the first.
        num_completions: Rows written each time (the batch's first completions, prompt-major).
    """

    def __init__(self, every_n_steps: int = 10, num_completions: int = 8):
        check_range("CompletionsLogger.every_n_steps", every_n_steps, 1, why="remove the callback to log none")
        check_range("CompletionsLogger.num_completions", num_completions, 1, why="a count")
        self.every_n_steps, self.num_completions = every_n_steps, num_completions

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lit_align.modules.grpo import GRPOModule

        if not isinstance(pl_module, GRPOModule):
            raise ConfigError(f"CompletionsLogger logs GRPOModule's sampled completions; {type(pl_module).__name__} "
                              "samples none: remove it from trainer.callbacks")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        sampled = outputs.get("completions") if isinstance(outputs, dict) else None
        if sampled is None or sampled.generation_index % self.every_n_steps != 0:
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective: every rank asks
        if not trainer.is_global_zero:
            return
        rows = completion_rows(sampled, self.num_completions)
        append_csv(run_dir / "completions.csv", rows)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("completions", markdown_table(rows), sampled.step)


__all__ = ["CompletionsLogger"]
