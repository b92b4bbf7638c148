"""Padding-free log-probs (lit_align.modules.packing) equal the padded forward's on real HH-RLHF pairs."""

from __future__ import annotations

import pytest
import torch

from lit_align.data.datamodule import AlignDataModule
from lit_align.models import LoraArgs, PolicyConfig, add_lora, load_causal_lm
from lit_align.modules.dpo import DPOModule
from lit_align.modules.packing import packed_sequence_logps, plan_packing, plan_shared_prompt, supports_packing
from lit_align.probes.features import select_features


@pytest.fixture(scope="module")
def batch(tiny_model_dir, shared_data):
    dm = AlignDataModule(
        str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"),
        format="hh_rlhf",
        tokenizer=str(tiny_model_dir),
        limit=24,
        batch_size=8,
        max_prompt_length=96,
        max_completion_length=48,
        on_bad_rows="skip",
        shuffle=False,
    )
    dm.setup()
    return next(iter(dm.train_dataloader()))


def padded_logps(model, input_ids, attention_mask, completion_mask, hidden=False):
    module = DPOModule.__new__(DPOModule)  # only the padded method, no model loading
    module.packing = False
    return DPOModule.sequence_logps(module, model, input_ids, attention_mask, completion_mask, hidden)


def test_plan_packs_densely_and_round_trips(batch):
    input_ids, attention_mask, _ = DPOModule.concatenated(batch)
    packing = plan_packing(attention_mask)
    rows, width = packing.packed_shape
    assert width == input_ids.shape[1] and rows <= input_ids.shape[0]
    packed = packing.pack(input_ids, fill=-1)
    assert int((packed >= 0).sum()) == int(attention_mask.sum())  # every real token placed exactly once
    restored = packing.unpack(packed)
    torch.testing.assert_close(restored * attention_mask, input_ids * attention_mask)
    # position ids restart at 0 for every sequence
    assert int((packing.position_ids.reshape(-1)[packing.dst] == 0).sum()) == input_ids.shape[0]


def test_shared_prompt_layout(batch):
    input_ids, attention_mask, completion_mask = DPOModule.concatenated(batch)
    plan = plan_shared_prompt(input_ids, attention_mask, completion_mask, "sdpa")
    pairs = input_ids.shape[0] // 2
    assert plan.packed_shape[0] == pairs
    prompt = int((attention_mask.bool() & ~completion_mask.bool())[:pairs].sum())
    assert plan.dst.numel() == int(attention_mask.sum())  # every real token mapped ...
    assert plan.dst.unique().numel() == int(attention_mask.sum()) - prompt  # ... and each prompt stored once
    torch.testing.assert_close(plan.unpack(plan.pack(input_ids)) * attention_mask, input_ids * attention_mask)
    other = input_ids.clone()
    other[-1, 0] = (other[-1, 0] + 1) % 100  # a rejected row whose prompt differs from its chosen row's
    assert plan_shared_prompt(other, attention_mask, completion_mask, "sdpa") is None
    assert plan_shared_prompt(input_ids, attention_mask, completion_mask, "flash_attention_2") is None


def test_left_padding_is_refused():
    with pytest.raises(ValueError, match="right-padded"):
        plan_packing(torch.tensor([[0, 1, 1], [1, 1, 1]]))


@pytest.mark.parametrize(
    "lora,share_prompt,attn", [(False, True, "sdpa"), (True, True, "sdpa"), (False, False, "sdpa"), (False, True, "eager")]
)
def test_packed_logps_and_grads_match_padded(tiny_model_dir, batch, lora, share_prompt, attn):
    torch.manual_seed(0)
    model = load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir), attn_implementation=attn)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if lora:
        model = add_lora(model, LoraArgs(r=4, alpha=8))
    assert supports_packing(model)
    input_ids, attention_mask, completion_mask = DPOModule.concatenated(batch)

    params = [p for p in model.parameters() if p.requires_grad]
    ours, ours_hidden = packed_sequence_logps(model, input_ids, attention_mask, completion_mask, True, share_prompt)
    ref, ref_hidden = padded_logps(model, input_ids, attention_mask, completion_mask, True)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9)

    half = input_ids.shape[0] // 2
    # eager attention takes its softmax in float32 (over wider rows here), so it agrees to float32 precision
    atol, rtol = (1e-9, 1e-7) if attn == "sdpa" else (1e-5, 1e-5)
    for rows in (slice(0, half), slice(half, None)):  # chosen only, rejected only
        ours_grads = torch.autograd.grad(ours[rows].sum(), params, retain_graph=True)
        for a, b in zip(ours_grads, torch.autograd.grad(ref[rows].sum(), params, retain_graph=True)):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    # Both together: Llama's RMSNorm runs in float32 even in a float64 model, and the shared layout adds
    # the prompt's gradients from both completions before that float32 step (the padded one after), so
    # the sum agrees to float32 precision.
    for a, b in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    layers = list(range(1, len(ref_hidden)))
    for pooling in ("last", "mean"):
        torch.testing.assert_close(
            select_features(ours_hidden, attention_mask, layers, pooling),
            select_features(ref_hidden, attention_mask, layers, pooling),
            atol=atol,
            rtol=rtol,
        )
