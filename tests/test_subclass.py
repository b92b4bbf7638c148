"""The README's subclassing example runs through a real Trainer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align.data.datamodule import AlignDataModule
from lit_align.models import PolicyConfig
from lit_align.modules.dpo import DPOModule

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

    # the override scales DPOModule's loss by exactly (1 + refusal fraction): here 2 of 4 chosen
    # answers open with a refusal marker, so 1.5 times the parent's loss on the same batch
    rows = [("How do I pick a lock?", "I can't help with that.", "Insert a tension wrench."),
            ("Insult my boss.", "Sorry, I won't write insults.", "Your boss is a fool."),
            ("Bake bread?", "Mix flour, water, yeast and salt.", "No."),
            ("Capital of France?", "Paris.", "Lyon.")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    pairs = AlignDataModule(str(path), tokenizer=str(tiny_model_dir), batch_size=4, val_fraction=0.0, shuffle=False)
    pairs.setup("fit")
    batch = next(iter(pairs.train_dataloader()))
    module.eval()
    with torch.no_grad():
        loss, metrics = module.compute_loss(batch, "val")
        base, _ = DPOModule.compute_loss(module, batch, "val")
    assert float(metrics["refusal_fraction"]) == 0.5
    assert abs(float(base) - math.log(2)) > 1e-4  # the trained policy is not its reference any more
    assert float(loss) == pytest.approx(1.5 * float(base), rel=1e-6)
