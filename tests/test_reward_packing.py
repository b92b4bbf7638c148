"""RewardModule's padding-free forward (each pair's prompt once) equals the padded one on real
HH-RLHF pairs: rewards, loss and gradients, for both heads, with and without LoRA."""

from __future__ import annotations

import pytest
import torch

from lit_align.data.datamodule import AlignDataModule
from lit_align.models import LoraArgs, PolicyConfig
from lit_align.modules.reward import RewardModule


@pytest.fixture(scope="module")
def batch(tiny_model_dir, shared_data):
    dm = AlignDataModule(
        str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"), format="hh_rlhf", tokenizer=str(tiny_model_dir),
        limit=24, batch_size=8, max_prompt_length=96, max_completion_length=48, on_bad_rows="skip", shuffle=False,
    )
    dm.setup()
    return next(iter(dm.train_dataloader()))


def reward_module(tiny_model_dir, head, lora, packing) -> RewardModule:
    module = RewardModule(PolicyConfig(name_or_path=str(tiny_model_dir), lora=lora), head=head, packing=packing)
    torch.manual_seed(0)
    module.configure_model()
    module.double()
    with torch.no_grad():  # move every weight off its initial value, the LoRA B matrices off zero
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


@pytest.mark.parametrize(
    "head, lora",
    [("sequence_classification", None), ("last_token", None), ("sequence_classification", LoraArgs(r=4, alpha=8))],
)
def test_packed_rewards_loss_and_grads_match_padded(tiny_model_dir, batch, head, lora):
    packed, padded = (reward_module(tiny_model_dir, head, lora, packing) for packing in (True, False))
    padded.load_state_dict(packed.state_dict())
    results = []
    for module in (packed, padded):
        loss, metrics = module.compute_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((loss.detach(), metrics, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-9, atol=1e-10)
    for key in metrics_b:
        torch.testing.assert_close(metrics_a[key], metrics_b[key], rtol=1e-9, atol=1e-10)
    assert grads_a.keys() == grads_b.keys() and grads_a
    # Llama's RMSNorm runs in float32 even in a float64 model, and the shared layout adds a prompt's
    # gradients from its two completions before that float32 step (the padded one after): the
    # gradients below the last norm agree to float32 precision (measured: 4e-9 against values ~0.3).
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_packed_rewards_equal_the_exported_classifier(tiny_model_dir, batch, tmp_path):
    """The shared-prompt layout reads each completion's reward where transformers' own sequence
    classifier does (the last token that is not the pad token)."""
    from transformers import AutoModelForSequenceClassification

    module = reward_module(tiny_model_dir, "sequence_classification", None, packing=True).float()
    ids, mask, completion = (torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                             for k in ("input_ids", "attention_mask", "completion_mask"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(module.export(tmp_path / "rm")).eval()
    with torch.no_grad():
        ours = module.reward(ids, mask, completion)
        theirs = reloaded(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
