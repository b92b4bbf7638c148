"""DPO losses: hand-computed values, and parity with TRL's DPOTrainer on identical inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lit_align.data.datamodule import AlignDataModule
from lit_align.losses.dpo import dpo_loss, sft_loss
from lit_align.models import PolicyConfig, load_causal_lm
from lit_align.modules.dpo import DPOModule


def test_sigmoid_and_conservative_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    z = (-10.0 + 11.0) - (-12.0 + 11.5)  # 1.5
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="sigmoid")
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.75))))
    assert chosen_r.item() == pytest.approx(0.5) and rejected_r.item() == pytest.approx(-0.25)
    gamma = 0.8
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="conservative", confidence=torch.tensor([gamma]))
    sig = 1 / (1 + math.exp(-0.5 * z))
    assert losses.item() == pytest.approx(-gamma * math.log(sig) - (1 - gamma) * math.log(1 - sig))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
def test_conservative_with_full_confidence_is_dpo(gamma):
    """cDPO against its closed form −γ log σ(βz) − (1−γ) log σ(−βz), computed here in float64
    with math.log / math.exp, for a scalar γ and the same γ given per pair; at γ = 1 it is DPO
    and at γ = 0 DPO with the pair swapped."""
    g = torch.Generator().manual_seed(0)
    logps = [torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4)]
    pc, pr, rc, rr = logps
    beta = 0.1
    expected = []
    for i in range(6):
        z = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        sig = 1 / (1 + math.exp(-beta * z))
        expected.append(-gamma * math.log(sig) - (1 - gamma) * math.log(1 - sig))
    expected = torch.tensor(expected, dtype=torch.float64)
    scalar, _, _ = dpo_loss(*logps, beta=beta, loss_type="conservative", confidence=gamma)
    per_pair, _, _ = dpo_loss(*logps, beta=beta, loss_type="conservative", confidence=torch.full((6,), gamma, dtype=torch.float64))
    torch.testing.assert_close(scalar, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_pair, expected, rtol=1e-12, atol=1e-12)
    if gamma == 1.0:
        torch.testing.assert_close(scalar, dpo_loss(*logps, beta=beta, loss_type="sigmoid")[0])
    if gamma == 0.0:
        torch.testing.assert_close(scalar, dpo_loss(pr, pc, rr, rc, beta=beta, loss_type="sigmoid")[0])


def test_unknown_loss_type_is_named():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'nope'"):
        dpo_loss(x, x, x, x, loss_type="nope")


@pytest.fixture(scope="module")
def batch_and_model(tiny_model_dir, shared_data):
    dm = AlignDataModule(
        str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"),
        format="hh_rlhf",
        tokenizer=str(tiny_model_dir),
        limit=16,
        batch_size=4,
        max_prompt_length=64,
        max_completion_length=32,
        on_bad_rows="skip",
        shuffle=False,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(1)
    # float64, so that the two implementations' log-prob arithmetic agrees far below the 1e-6 tolerance
    policy = load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir))).double().eval()
    with torch.no_grad():  # a policy that differs from the reference, so the losses are not trivial
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return batch, policy, dm.tokenizer


@pytest.mark.parametrize(
    "loss_type,label_smoothing,sft_weight",
    [("sigmoid", 0.0, 0.0), ("ipo", 0.0, 0.0), ("hinge", 0.0, 0.0), ("robust", 0.2, 0.0), ("sigmoid", 0.0, 0.7)],
)
def test_matches_trl_dpo_trainer(batch_and_model, tiny_model_dir, loss_type, label_smoothing, sft_weight, tmp_path, trl):
    """Our loss on our log-probs equals TRL's `_compute_loss` on the same tokens and reference
    (with `sft_weight`, TRL's `loss_type=[loss, "sft"]`, `loss_weights=[1, sft_weight]`)."""
    from datasets import Dataset

    batch, policy, tokenizer = batch_and_model
    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type=loss_type, beta=0.3, label_smoothing=label_smoothing)
    input_ids, attention_mask, completion_mask = module.concatenated(batch)
    with torch.no_grad():
        logps, _ = module.sequence_logps(policy, input_ids, attention_mask, completion_mask)
        reference = load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir))).double().eval()
        ref_logps, _ = module.sequence_logps(reference, input_ids, attention_mask, completion_mask)
    ours, _, _ = dpo_loss(
        *logps.chunk(2),
        *ref_logps.chunk(2),
        beta=0.3,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=completion_mask.sum(-1).chunk(2)[0],
        rejected_lengths=completion_mask.sum(-1).chunk(2)[1],
    )
    ours = ours.mean()
    if sft_weight:
        ours = ours + sft_weight * sft_loss(logps.chunk(2)[0], completion_mask.sum(-1).chunk(2)[0])
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        loss_type=[loss_type, "sft"] if sft_weight else [loss_type],
        loss_weights=[1.0, sft_weight] if sft_weight else None,
        beta=0.3,
        label_smoothing=label_smoothing,
        precompute_ref_log_probs=True,
        report_to=[],
        use_cpu=True,
    )
    rows = Dataset.from_dict({"prompt": ["a"] * 2, "chosen": ["b"] * 2, "rejected": ["c"] * 2})
    trainer = trl.DPOTrainer(model=policy, args=args, train_dataset=rows, processing_class=tokenizer)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-6, rtol=1e-6)
