"""The next token from a decode step's logits: CTRL's repetition penalty, temperature, top-k,
top-p and one draw per row by inverting the CDF (the lean loop's `pick`, lit_align.generation.lean).
Pure functions of the logits; greedy decoding is their argmax."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_align.generation.config import SamplingConfig


def filter_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p): removed tokens get -inf."""
    if sampling.temperature != 1.0:  # x / 1 is x: skip a pass over the vocabulary
        logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        logits = logits.masked_fill(outside_nucleus(logits, sampling.top_p), float("-inf"))
    return logits


NUCLEUS_CANDIDATES = (64, 1024)  # sorting a 49k vocabulary costs more than the rest of a decode step


def outside_nucleus(logits: Tensor, top_p: float) -> Tensor:
    """The tokens top-p drops: those whose more likely tokens already hold top_p of the mass (the
    most likely always stays). Each row's nucleus is looked for among its NUCLEUS_CANDIDATES[0]
    likeliest tokens, which is exact when they hold more than top_p; the rows where they do not
    try the next count, and the last rows sort the whole vocabulary."""
    drop = torch.ones_like(logits, dtype=torch.bool)
    rows = torch.arange(len(logits), device=logits.device)
    logz = logits.logsumexp(-1, keepdim=True)
    for k in (*(k for k in NUCLEUS_CANDIDATES if k < logits.shape[-1]), logits.shape[-1]):
        top, order = logits[rows].topk(k, dim=-1)
        probs = (top - logz[rows]).exp()
        mass = probs.cumsum(-1)
        done = mass[:, -1] > top_p if k < logits.shape[-1] else torch.ones_like(rows, dtype=torch.bool)
        drop[rows[done]] = drop[rows[done]].scatter(-1, order[done], (mass - probs)[done] > top_p)
        rows = rows[~done]
        if not len(rows):
            return drop
    return drop


def draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """One token per row by inverting the CDF at `uniform` (one number in [0, 1) per row, `[rows, 1]`):
    `torch.multinomial` would draw one per vocabulary entry. Zero-probability tokens are never picked."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = uniform * total
    u = u.minimum(total.nextafter(torch.zeros_like(total)))  # strictly below the total, even after rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def penalize_repeats(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty on every token already in the row (prompt or completion)."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)
