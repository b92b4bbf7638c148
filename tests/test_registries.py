"""Losses and dataset formats live in registries: the registry's names are the `Literal` choices
`--help` lists, and an entry added to a registry is all the code needs to use it."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from lit_align.data import formats
from lit_align.losses import dpo, grpo


def test_literal_choices_are_the_registry_names():
    assert get_args(dpo.LossType) == tuple(dpo.DPO_LOSSES) == dpo.LOSS_TYPES
    assert get_args(grpo.LossType) == tuple(grpo.REDUCTIONS) == grpo.LOSS_TYPES
    assert get_args(formats.Format) == tuple(formats.PRESETS) == formats.FORMATS


def test_help_lists_the_choices(capsys):
    from lit_align.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lit_align.DPOModule"])
    out = capsys.readouterr().out
    assert "--model.loss_type {sigmoid,ipo,hinge,robust,conservative}" in out
    assert "--model.reference {copy,lora_base,cached}" in out


def test_a_registered_dpo_loss_is_computed_and_its_reads_are_honoured(monkeypatch, tiny_model_dir):
    from lit_align.checks import ConfigError
    from lit_align.models import PolicyConfig
    from lit_align.modules.dpo import DPOModule

    # a smoothed hinge that reads label_smoothing: max(0, 1 − ε − β z)
    smoothed = dpo.DPOLoss(lambda t: torch.relu(1 - t.label_smoothing - t.beta * t.z), reads_label_smoothing=True)
    monkeypatch.setitem(dpo.DPO_LOSSES, "smoothed_hinge", smoothed)
    logps = [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])]
    losses, _, _ = dpo.dpo_loss(*logps, beta=0.5, loss_type="smoothed_hinge", label_smoothing=0.2)
    z = torch.tensor([2.0, -1.0])  # (−1 + 2) − (−3 + 2), (−2 + 2) − (−1 + 2)
    torch.testing.assert_close(losses, torch.relu(0.8 - 0.5 * z))

    policy = PolicyConfig(name_or_path=str(tiny_model_dir))
    DPOModule(policy, loss_type="smoothed_hinge", label_smoothing=0.2)  # it reads ε: accepted
    with pytest.raises(ConfigError, match="has no effect with loss_type='hinge': only robust, conservative and "
                                          "smoothed_hinge read it"):
        DPOModule(policy, loss_type="hinge", label_smoothing=0.2)


def test_a_registered_grpo_reduction_is_used(monkeypatch):
    monkeypatch.setitem(grpo.REDUCTIONS, "sum", lambda total, mask, *_: total.sum())
    per_token, mask = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 7.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(grpo.reduce_loss(per_token, mask, "sum")) == 6.0  # 1 + 2 + 3: masked tokens left out
    assert float(grpo.reduce_loss(per_token, mask, "bnpo")) == 2.0


def test_a_registered_format_is_read(monkeypatch):
    def qa(row, mode, source, index):  # columns question / good / bad
        return [{"prompt": [{"role": "user", "content": row["question"]}], "chosen": row["good"],
                 "rejected": row["bad"], "category": None}]

    monkeypatch.setitem(formats.PRESETS, "qa", qa)
    rows, skipped = formats.normalize_rows([{"question": "Hi?", "good": "Hello.", "bad": "Go away."}], format="qa")
    assert skipped == 0 and rows[0]["chosen"] == "Hello." and rows[0]["prompt"][0]["content"] == "Hi?"
