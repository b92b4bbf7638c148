"""The README's subclassing example runs through a real Trainer."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch

from lit_align.data.datamodule import AlignDataModule
from lit_align.models import PolicyConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    block = re.search(r"### Subclassing.*?```python\n(.*?)```", text, re.S)
    assert block, "README lost its subclassing example"
    return block.group(1)


def test_readme_subclass_trains(tiny_model_dir, shared_data, tmp_path):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    module = namespace["RefusalWeightedDPO"](
        PolicyConfig(name_or_path=str(tiny_model_dir)), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)
    )
    dm = AlignDataModule(
        str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"), format="hh_rlhf", limit=24, batch_size=4,
        max_prompt_length=48, max_completion_length=24, on_bad_rows="skip",
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert "refusal_fraction" in trainer.callback_metrics
    loss, metrics = module.compute_loss(next(iter(dm.train_dataloader())), "val")
    assert torch.isfinite(loss) and 0.0 <= float(metrics["refusal_fraction"]) <= 1.0
