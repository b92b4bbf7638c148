"""Token log-probabilities from logits: the one place the log-softmax of a label is taken."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(y_t | y_<t) = z_{y_t} − log Σ_v exp z_v for logits `[..., V]` and labels `[...]`.

    Half-precision logits are upcast first: a log-softmax in float16/bfloat16 loses the small
    probabilities."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


__all__ = ["token_logps"]
