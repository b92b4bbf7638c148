"""What `use_bias_correction_kl` does to the KL term's gradient on-policy (docs/grpo.md, "The KL term").

On-policy (π_old = π_θ, so ρ = 1 in value) the two forms have the same value but not the same
gradient. Summed exactly over a categorical policy's tokens y ~ π_θ (no sampling noise):

* with the correction (ρ · k3, TRL's default): E[∇ℓ] = ∇ KL(π_θ ‖ π_ref), the reverse KL;
* without it (k3 alone, DeepSeekMath and SRMIR): E[∇ℓ] = ∇ KL(π_ref ‖ π_θ), the forward KL.
"""

from __future__ import annotations

import pytest
import torch

from lit_align.losses.grpo import grpo_loss

# the numbers docs/grpo.md quotes
POLICY_LOGITS = [1.0, 0.5, 0.0, -1.0]
REF_LOGITS = [0.0, 1.0, -0.5, 0.5]


def expected_kl_gradient(theta: torch.Tensor, ref_logps: torch.Tensor, correction: bool) -> torch.Tensor:
    """Σ_y π(y) ∇ℓ(y) with ℓ the GRPO loss of one on-policy token y, advantage 0, β = 1."""
    logps = theta.log_softmax(-1)
    probs = logps.exp().detach()  # the sampling distribution is not differentiated
    total = 0.0
    for y in range(theta.numel()):
        loss, _ = grpo_loss(logps[y].view(1, 1), None, torch.zeros(1), torch.ones(1, 1), ref_logps[y].view(1, 1),
                            beta=1.0, loss_type="bnpo", use_bias_correction_kl=correction)
        total = total + probs[y] * loss
    (grad,) = torch.autograd.grad(total, theta)
    return grad


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_on_policy_kl_gradient_with_and_without_correction(seed):
    if seed is None:
        theta, ref_logits = torch.tensor(POLICY_LOGITS), torch.tensor(REF_LOGITS)
    else:
        g = torch.Generator().manual_seed(seed)
        theta, ref_logits = torch.randn(6, generator=g), torch.randn(6, generator=g)
    theta.requires_grad_(True)
    ref = ref_logits.log_softmax(-1)
    logps = theta.log_softmax(-1)
    reverse = (logps.exp() * (logps - ref)).sum()  # KL(π_θ ‖ π_ref)
    forward = (ref.exp() * (ref - logps)).sum()  # KL(π_ref ‖ π_θ)
    (grad_reverse,) = torch.autograd.grad(reverse, theta, retain_graph=True)
    (grad_forward,) = torch.autograd.grad(forward, theta)

    corrected = expected_kl_gradient(theta, ref, correction=True)
    plain = expected_kl_gradient(theta, ref, correction=False)
    torch.testing.assert_close(corrected, grad_reverse, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain, grad_forward, atol=1e-6, rtol=1e-5)
    assert (corrected - plain).abs().max() > 0.01  # the choice changes the update even on-policy
    if seed is None:
        torch.testing.assert_close(corrected, torch.tensor([0.3217, -0.2361, 0.0312, -0.1168]), atol=1e-4, rtol=0)
        torch.testing.assert_close(plain, torch.tensor([0.3066, -0.1676, 0.0728, -0.2119]), atol=1e-4, rtol=0)


def test_per_token_coefficient_on_policy():
    """∂ℓ/∂log π(y): log(π/π_ref) with the correction, 1 − π_ref/π without; the KL value is the same."""
    logp = torch.tensor([[0.5, 0.25, 0.125]]).log().requires_grad_(True)
    ref = torch.tensor([[0.25, 0.5, 0.125]]).log()
    mask, adv = torch.ones(1, 3), torch.zeros(1)
    out = {}
    for correction in (True, False):
        loss, stats = grpo_loss(logp, None, adv, mask, ref, beta=1.0, loss_type="dr_grpo", max_completion_length=1,
                                use_bias_correction_kl=correction)
        (grad,) = torch.autograd.grad(loss, logp)
        out[correction] = (grad, stats.kl)
    torch.testing.assert_close(out[True][0], (logp - ref).detach())
    torch.testing.assert_close(out[False][0], 1 - (ref - logp).exp().detach())
    torch.testing.assert_close(out[True][1], out[False][1])  # same logged kl
