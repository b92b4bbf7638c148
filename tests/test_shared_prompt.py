"""GRPO log-probs with each prompt computed once (lit_align.modules.shared_prompt) equal the
padded forward's, and so do their gradients."""

from __future__ import annotations

import pytest
import torch

from lit_align.generation import LeanGenerator, SamplingConfig
from lit_align.losses.grpo import token_logps_and_entropy
from lit_align.models import LoraArgs, PolicyConfig, add_lora, load_causal_lm, load_tokenizer
from lit_align.modules.shared_prompt import completion_logits, prompt_groups, shared_prompt_logits, supports_shared_prompt

PROMPTS = [
    "Human: How do I keep my sourdough starter alive while I am away for two weeks?\n\nAssistant:",
    "Human: hi\n\nAssistant:",
    "Human: Write a short poem about rain on a tin roof.\n\nAssistant:",
]
G = 4


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    cfg = PolicyConfig(name_or_path=str(tiny_model_dir))
    sampler = LeanGenerator(load_causal_lm(cfg), load_tokenizer(cfg))
    ids, mask = sampler.encode_prompts(PROMPTS)
    out = sampler.generate_ids(ids, mask, SamplingConfig(max_new_tokens=12), G, generator_seed=0)
    completion_mask = out.completion_mask.clone()
    completion_mask[1, 5:] = 0  # as if these rows had ended early (or were masked as truncated)
    completion_mask[6, 1:] = 0
    completion_mask[9] = 0
    return out.prompt_ids, out.prompt_mask, out.completion_ids, completion_mask


# float64 except eager attention, whose padded forward turns left-padded rows to NaN in float64
# (fully masked padding queries) in transformers itself
@pytest.mark.parametrize("lora,attn,dtype", [(False, "sdpa", torch.float64), (True, "sdpa", torch.float64), (False, "eager", torch.float32)])
def test_logps_and_grads_match_padded(tiny_model_dir, rollout, lora, attn, dtype):
    torch.manual_seed(0)
    model = load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir), attn_implementation=attn)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if lora:
        model = add_lora(model, LoraArgs(r=4, alpha=8))
    assert supports_shared_prompt(model)
    prompt_ids, prompt_mask, completion_ids, completion_mask = rollout
    params = [p for p in model.parameters() if p.requires_grad]
    keep = completion_mask.bool()
    grads = []
    for rows in (slice(None), slice(3, 10)):  # a whole rollout; a micro-batch cutting groups
        args = (prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows])
        ours = token_logps_and_entropy(shared_prompt_logits(model, *args), completion_ids[rows], 0.7)
        ref = token_logps_and_entropy(completion_logits(model, *args, share_prompt=False), completion_ids[rows], 0.7)
        for a, b in zip(ours, ref):  # positions differ by the left padding: RoPE's float32 rotations round differently
            torch.testing.assert_close(a[keep[rows]], b[keep[rows]], atol=1e-5, rtol=1e-5)
        loss = lambda logps: (logps * completion_mask[rows]).sum()
        grads.append((torch.autograd.grad(loss(ours[0]), params), torch.autograd.grad(loss(ref[0]), params)))
    for ours_grads, ref_grads in grads:
        for a, b in zip(ours_grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_groups_and_fallbacks(tiny_model_dir, rollout):
    prompt_ids, prompt_mask, completion_ids, completion_mask = rollout
    assert prompt_groups(prompt_ids, prompt_mask).tolist() == [0] * G + [1] * G + [2] * G
    assert prompt_groups(prompt_ids[3:6], prompt_mask[3:6]).tolist() == [0, 1, 1]
    model = load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir)))
    rows = [0, G, 2 * G]  # one completion per prompt: nothing to share, the caller runs the padded forward
    assert shared_prompt_logits(model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows]) is None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not supports_shared_prompt(model)  # checkpointed layers drop the cache
