"""GRPO math against hand-made groups and against TRL 1.16's GRPOTrainer on identical tensors.

Parity method: a real `trl.GRPOTrainer` is built once around the tiny model. For the loss we
call its `_compute_loss(model, inputs)` with hand-made `old_per_token_logps`,
`ref_per_token_logps` and `advantages` (TRL computes the policy log-probs itself from the
model); ours runs `token_logps_and_entropy` + `grpo_loss` on the same model's logits. For
advantages we call TRL's `_generate_and_score_completions` with reward functions that return
fixed numbers (and None), and compare its `advantages` with `compute_advantages`. The
trainer's options (`loss_type`, `beta`, `epsilon_*`, `scale_rewards`, ...) are its own
attributes, set per case.
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_align.losses.grpo import (
    compute_advantages,
    group_advantages,
    grpo_loss,
    k3_kl,
    nanstd,
    reduce_loss,
    token_logps_and_entropy,
)

NAN = float("nan")


# ---------------------------------------------------------------------------- hand-made groups
def test_group_advantages_hand_made():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(rewards, num_generations=4, scale_rewards="group")
    s = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4)
    torch.testing.assert_close(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # identical rewards: no signal
    assert std[4:].eq(0).all()

    adv_none, _ = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(adv_none, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))

    adv_batch, std_b = group_advantages(rewards, 4, "batch")
    sb = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2]).std().item()
    torch.testing.assert_close(std_b, torch.full((8,), sb))
    torch.testing.assert_close(adv_batch, adv_none / (sb + 1e-4))


def test_none_reward_is_left_out_of_the_group():
    # Source 1 scores everything; source 2 applies to the first group only.
    per_func = torch.tensor(
        [[1.0, 1.0], [0.0, 0.0], [3.0, NAN], [NAN, NAN], [5.0, NAN], [1.0, NAN]]
    )
    out = compute_advantages(per_func, torch.tensor([1.0, 1.0]), num_generations=3)
    # group 1: weighted sums 2, 0, 3; group 2: the unscorable sample is excluded and gets 0
    torch.testing.assert_close(out.rewards[:3], torch.tensor([2.0, 0.0, 3.0]))
    assert math.isnan(out.rewards[3].item())
    assert out.advantages[3].item() == 0.0
    torch.testing.assert_close(out.advantages[4:], torch.tensor([2.0, -2.0]) / (math.sqrt(8) + 1e-4))
    assert not torch.isnan(out.advantages).any()


def test_nanstd_matches_torch_std():
    x = torch.randn(5, 7)
    torch.testing.assert_close(nanstd(x, dim=1), x.std(dim=1))
    torch.testing.assert_close(nanstd(x), x.std())
    assert math.isnan(nanstd(torch.tensor([1.0, NAN])).item())


def test_k3_kl_values_and_expectation_is_the_kl():
    """k3(x) = e^(r−l) − (r−l) − 1 per token (l = log π_θ, r = log π_ref), checked at points by hand,
    and as an estimator: its mean under π_θ, summed exactly over a vocabulary, equals
    KL(π_θ ‖ π_ref) from torch.distributions (a k1 or k2 estimator, or the reverse KL, would not)."""
    logps = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref = logps + torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[math.e - 2.0, math.exp(-1.0), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(k3_kl(logps, ref), expected, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        policy = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64) * 2, -1)
        reference = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64) * 2, -1)
        estimate = (policy.exp() * k3_kl(policy, reference)).sum()
        kl = torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=policy), torch.distributions.Categorical(logits=reference)
        )
        assert float(estimate) == pytest.approx(float(kl), rel=1e-9) and float(kl) > 0.1


def test_dr_grpo_and_dapo_need_their_normalisers():
    loss = torch.ones(2, 3)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_completion_length"):
        reduce_loss(loss, mask, "dr_grpo")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        reduce_loss(loss, mask, "dapo")
    with pytest.raises(ValueError, match="loss_type"):
        reduce_loss(loss, mask, "ppo")


# ---------------------------------------------------------------------------- TRL parity
TEMPERATURE = 0.7
MAX_COMPLETION = 6
G = 4


def _zero_reward(prompts, completions, **kwargs):
    return [0.0] * len(prompts)


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir, tmp_path_factory, trl):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}] * G

    def first(prompts, completions, **kwargs):
        return _zero_reward(prompts, completions)

    def second(prompts, completions, **kwargs):
        return _zero_reward(prompts, completions)

    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        beta=0.04,
        report_to="none",
        use_cpu=True,
        gradient_checkpointing=False,
        bf16=False,
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=[first, second], args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def _inputs(seed: int, n: int = 6, prompt_len: int = 5, vocab: int = 400):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (n, prompt_len), generator=g)
    prompt_mask = torch.ones(n, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_mask[3, :1] = 0
    completion_ids = torch.randint(3, vocab, (n, MAX_COMPLETION), generator=g)
    lengths = torch.tensor([6, 2, 4, 6, 1, 5])[:n]
    completion_mask = (torch.arange(MAX_COMPLETION)[None] < lengths[:, None]).long()
    return prompt_ids, prompt_mask, completion_ids, completion_mask, g


def _our_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    logits = logits[:, prompt_ids.size(1) - 1 : -1]
    return token_logps_and_entropy(logits, completion_ids, TEMPERATURE)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,epsilon_high,kl_correction", [(0.0, None, True), (0.04, 0.28, True), (0.04, 0.2, False)])
def test_loss_matches_trl(trl_trainer, loss_type, beta, epsilon_high, kl_correction):
    trainer = trl_trainer
    trainer.args.use_bias_correction_kl = kl_correction
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.epsilon_low = 0.2
    trainer.epsilon_high = 0.2 if epsilon_high is None else epsilon_high
    trainer._metrics["train"].clear()
    model = trainer.model

    prompt_ids, prompt_mask, completion_ids, completion_mask, g = _inputs(seed=1)
    with torch.no_grad():
        logps, _ = _our_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    # old / reference policies a little away from the current one, so clipping and KL are active
    old_logps = logps + 0.4 * torch.randn(logps.shape, generator=g)
    ref_logps = logps + 0.3 * torch.randn(logps.shape, generator=g)
    advantages = torch.randn(logps.size(0), generator=g)
    num_items = completion_mask.sum() + 7  # dapo: tokens of a larger generation batch

    trl_loss = trainer._compute_loss(
        model,
        {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": advantages, "old_per_token_logps": old_logps,
            "ref_per_token_logps": ref_logps, "num_items_in_batch": num_items,
        },
    )
    logps, entropy = _our_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    loss, stats = grpo_loss(
        logps, old_logps, advantages, completion_mask, ref_logps=ref_logps, beta=beta,
        epsilon=0.2, epsilon_high=epsilon_high, loss_type=loss_type,
        max_completion_length=MAX_COMPLETION, num_items_in_batch=num_items,
        use_bias_correction_kl=kl_correction,
    )
    assert abs(loss.item() - trl_loss.item()) < 1e-6, (loss.item(), trl_loss.item())
    m = trainer._metrics["train"]
    assert stats.clip_region.item() > 0  # the case exercises clipping
    for ours, name in [(stats.clip_low, "clip_ratio/low_mean"), (stats.clip_high, "clip_ratio/high_mean"),
                       (stats.clip_region, "clip_ratio/region_mean")]:
        assert abs(ours.item() - m[name][-1]) < 1e-6, name
    mask = completion_mask.float()
    assert abs(((entropy * mask).sum() / mask.sum()).item() - m["entropy"][-1]) < 1e-5
    if beta:
        assert abs(stats.kl.item() - m["kl"][-1]) < 1e-6

    # gradients agree too
    model.zero_grad()
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    loss.backward()
    ours_grads = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(trl_grads, ours_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    model.zero_grad()


def _trl_advantages(trainer, rewards_per_func: torch.Tensor):
    """Run TRL's generate-and-score step with reward functions returning the given columns."""
    columns = [[None if math.isnan(v) else v for v in rewards_per_func[:, k].tolist()] for k in range(2)]
    for k, func in enumerate(trainer.reward_funcs):
        trainer.reward_funcs[k] = _fixed(columns[k], func.__name__)
    rows = [{"prompt": [{"role": "user", "content": f"q{i // G}"}]} for i in range(rewards_per_func.size(0))]
    with torch.no_grad():
        out = trainer._generate_and_score_completions(rows)
    return out["advantages"], trainer._metrics["train"]


def _fixed(values, name):
    def reward(prompts, completions, **kwargs):
        assert len(prompts) == len(values)
        return list(values)

    reward.__name__ = name
    return reward


@pytest.mark.parametrize(
    "aggregation,scale", [("sum_then_normalize", "group"), ("sum_then_normalize", "batch"),
                          ("sum_then_normalize", "none"), ("normalize_then_sum", "group")]
)
def test_advantages_match_trl(trl_trainer, aggregation, scale):
    trainer = trl_trainer
    trainer.multi_objective_aggregation, trainer.scale_rewards = aggregation, scale
    weights = torch.tensor([1.0, 0.5])
    trainer.reward_weights = weights
    trainer._metrics["train"].clear()
    # 3 groups of 4: mixed, one constant group, a group with None rewards (one unscorable)
    per_func = torch.tensor(
        [[1.0, 2.0], [0.0, 1.0], [0.5, 0.0], [2.0, 0.3],
         [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0],
         [3.0, NAN], [NAN, NAN], [0.0, NAN], [1.0, 4.0]]
    )
    trl_adv, metrics = _trl_advantages(trainer, per_func)
    ours = compute_advantages(per_func, weights, G, scale, aggregation)
    torch.testing.assert_close(ours.advantages, trl_adv.float(), atol=1e-6, rtol=0)
    assert abs(ours.std_is_zero.float().mean().item() - metrics["frac_reward_zero_std"][-1]) < 1e-6
    assert abs(torch.nanmean(ours.rewards).item() - metrics["reward"][-1]) < 1e-6
    assert abs(nanstd(ours.rewards).item() - metrics["reward_std"][-1]) < 1e-6


def test_grpo_loss_module_matches_the_function():
    from lit_align.losses.grpo import GRPOLoss

    g = torch.Generator().manual_seed(5)
    logps, old, ref = (torch.randn(4, 5, generator=g) for _ in range(3))
    mask = (torch.rand(4, 5, generator=g) > 0.3).long()
    adv = torch.randn(4, generator=g)
    module = GRPOLoss(beta=0.1, epsilon=0.2, epsilon_high=0.3, loss_type="bnpo")
    loss, stats = module(logps, old, adv, mask, ref_logps=ref)
    expected, expected_stats = grpo_loss(logps, old, adv, mask, ref, beta=0.1, epsilon=0.2, epsilon_high=0.3,
                                         loss_type="bnpo")
    assert loss.item() == expected.item() and stats.kl.item() == expected_stats.kl.item()
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, adv, mask, beta=0.1)
