"""Training a probe on cached features without a Trainer (seconds on CPU).

`ProbeModule` is the LightningCLI route; this is the plain-PyTorch route for scripts,
benchmarks and candidate re-ranking, on the same losses.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lit_align.losses.probe import bce_loss, pairwise_margin_loss
from lit_align.probes.probe import MeanDiffProbe, Probe


def fit_probe(
    probe: Probe,
    features: Tensor,
    labels: Optional[Tensor] = None,
    rejected_features: Optional[Tensor] = None,
    margin: float = 1.0,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    epochs: int = 50,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Fit `probe` and return the mean loss of each epoch.

    Labelled texts: `features` [N, n, H] with `labels` [N] (1 safe, 0 unsafe), BCE loss.
    Pairs: `features` are the chosen and `rejected_features` the rejected texts, margin loss.
    Input standardisation (and a mean-difference direction) are fitted first, as in the paper's
    setting of Adam with lr 1e-3 and weight decay 0.01.
    """
    pairs = rejected_features is not None
    if not pairs and labels is None:
        raise ValueError("fit_probe needs labels for labelled texts, or rejected_features for pairs")
    everything = torch.cat([features, rejected_features]) if pairs else features
    targets = torch.cat([torch.ones(len(features)), torch.zeros(len(features))]) if pairs else labels
    probe.set_feature_stats(everything)
    if isinstance(probe, MeanDiffProbe):
        probe.fit(everything, targets)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        losses = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if pairs:
                loss = pairwise_margin_loss(probe(features[idx]), probe(rejected_features[idx]), margin)[0]
            else:
                loss = bce_loss(probe(features[idx]), labels[idx].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
    probe.eval()
    return history


__all__ = ["fit_probe"]
