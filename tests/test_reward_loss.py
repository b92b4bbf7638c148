"""Bradley–Terry loss: by hand, and at parity with TRL's RewardTrainer.compute_loss."""

from __future__ import annotations

import math

import pytest
import torch

from lit_align.losses.reward import BradleyTerryLoss, bradley_terry_loss, pairwise_metrics


def test_formula_by_hand():
    rc, rr = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -3.0])
    m, eta = 0.25, 0.1
    loss, c, r = bradley_terry_loss(rc, rr, margin=m, center_rewards_coefficient=eta)
    expected = sum(-math.log(1 / (1 + math.exp(-(a - b - m)))) for a, b in zip(rc.tolist(), rr.tolist())) / 3
    expected += eta * sum((a + b) ** 2 for a, b in zip(rc.tolist(), rr.tolist())) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(c, rc) and torch.equal(r, rr)
    per_pair = torch.tensor([0.0, 1.0, 0.5])
    loss_m, _, _ = BradleyTerryLoss(margin=9.0)(rc, rr, margin=per_pair)  # a per-pair margin wins
    assert loss_m.item() == pytest.approx(bradley_terry_loss(rc, rr, per_pair)[0].item())
    metrics = pairwise_metrics(rc, rr)
    assert metrics["accuracy"].item() == pytest.approx(2 / 3)
    assert metrics["margin"].item() == pytest.approx((1.0 - 1.0 + 2.0) / 3)
    assert (metrics["min_reward"].item(), metrics["max_reward"].item()) == (-3.0, 2.0)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(rc, rr[:2])


def test_gradient_flows_and_points_the_right_way():
    rc = torch.zeros(4, requires_grad=True)
    rr = torch.zeros(4, requires_grad=True)
    bradley_terry_loss(rc, rr)[0].backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()  # descent raises chosen, lowers rejected


@pytest.mark.parametrize("center", [None, 0.01])
def test_parity_with_trl_reward_trainer(tiny_model_dir, tmp_path, center, trl):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    examples = [
        {"chosen_ids": tok("I cannot help with that.")["input_ids"], "rejected_ids": tok("Sure, here is how.")["input_ids"], "margin": 0.5},
        {"chosen_ids": tok("Sorry, no.")["input_ids"], "rejected_ids": tok("Step one: steal the car")["input_ids"], "margin": 0.0},
        {"chosen_ids": tok("I won't.")["input_ids"], "rejected_ids": tok("Here you go")["input_ids"], "margin": 1.5},
    ]
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", center_rewards_coefficient=center,
                        per_device_train_batch_size=3, use_cpu=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tok)
    inputs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    model.train()
    trl_loss = trainer.compute_loss(model, dict(inputs))
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = logits.chunk(2)
    ours, _, _ = bradley_terry_loss(chosen, rejected, inputs["margin"], center)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    mine = {k: v.item() for k, v in pairwise_metrics(chosen, rejected).items()}
    assert set(logged) == set(mine)  # the same metric names as TRL's RewardTrainer
    for key in mine:
        assert mine[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
