"""Reward probes on hidden states (paper A, SPEC A1) and two baselines.

Every probe maps features `[B, len(layers), H]` (from `select_features`) to scores `[B]`;
σ(score) is the probe's belief that the text is safe. Probes standardise their input with
stored per-layer mean/std (fitted on training features: LLM hidden states have a few huge
outlier dimensions that otherwise swamp a linear probe), and save to one small safetensors
file that carries their kind, layers, hidden size and pooling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

FORMAT = "lit_align.probe/1"


class Probe(nn.Module):
    """Shared plumbing: layer list, input standardisation, shape checks, save."""

    kind = "probe"

    def __init__(self, hidden_size: int, layers: list[int], pooling: str = "last"):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.layers = [int(l) for l in layers]
        self.pooling = pooling
        n = len(self.layers)
        self.register_buffer("feature_mean", torch.zeros(n, self.hidden_size))
        self.register_buffer("feature_std", torch.ones(n, self.hidden_size))

    @torch.no_grad()
    def set_feature_stats(self, features: Tensor) -> None:
        """Standardise inputs with the mean/std of `features` [N, len(layers), H]."""
        self._check(features)
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp(min=1e-6))

    def normalise(self, features: Tensor) -> Tensor:
        self._check(features)
        return (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std

    def _check(self, features: Tensor) -> None:
        expected = (len(self.layers), self.hidden_size)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects features [B, {expected[0]}, {expected[1]}] "
                f"(layers {self.layers}, hidden size {self.hidden_size}); got {tuple(features.shape)}"
            )

    def layer_scores(self, features: Tensor) -> Tensor:
        """Per-layer scores [B, len(layers)] (for per-layer AUROC tables)."""
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "layers": json.dumps(self.layers),
            "hidden_size": str(self.hidden_size),
            "pooling": self.pooling,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=meta)
        return path

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, layers={self.layers}, pooling={self.pooling!r}"


class HybridProbe(Probe):
    """Mixture of per-layer linear probes with a sigmoid vote gate (SPEC A1):

        s_l = w_l · h_l + b_l,   g = σ(W_vote s)  (W_vote: L×L, no bias),   r = Σ_l g_l s_l

    W_vote starts at zero, so every gate starts at 0.5 and r starts as half the sum of the
    per-layer scores; training then learns which layers to trust.
    """

    kind = "hybrid"

    def __init__(self, hidden_size: int, layers: list[int], pooling: str = "last"):
        super().__init__(hidden_size, layers, pooling)
        n = len(self.layers)
        self.weight = nn.Parameter(torch.zeros(n, self.hidden_size))
        self.bias = nn.Parameter(torch.zeros(n))
        self.vote = nn.Linear(n, n, bias=False)
        nn.init.zeros_(self.vote.weight)

    def layer_scores(self, features: Tensor) -> Tensor:
        h = self.normalise(features)
        return torch.einsum("blh,lh->bl", h, self.weight) + self.bias

    def gates(self, layer_scores: Tensor) -> Tensor:
        return torch.sigmoid(self.vote(layer_scores))

    def forward(self, features: Tensor) -> Tensor:
        s = self.layer_scores(features)
        return (self.gates(s) * s).sum(-1)


class LogisticProbe(Probe):
    """Baseline: one linear probe on one layer, r = w · h + b (logistic regression)."""

    kind = "logistic"

    def __init__(self, hidden_size: int, layer: int, pooling: str = "last"):
        super().__init__(hidden_size, [layer], pooling)
        self.linear = nn.Linear(self.hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def layer_scores(self, features: Tensor) -> Tensor:
        return self.linear(self.normalise(features)[:, 0]).view(-1, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.layer_scores(features)[:, 0]


class MeanDiffProbe(Probe):
    """Baseline: the mean-difference direction of representation engineering.

    `fit` sets d = μ_safe − μ_unsafe (unit length) and the midpoint between the two means;
    the score is  r = a · (d · h − d · (μ_safe + μ_unsafe) / 2) + b  with a learnable scale a
    (init 1) and offset b (init 0) so the score can be calibrated by the same losses.
    """

    kind = "mean_diff"

    def __init__(self, hidden_size: int, layer: int, pooling: str = "last"):
        super().__init__(hidden_size, [layer], pooling)
        self.register_buffer("direction", torch.zeros(self.hidden_size))
        self.register_buffer("midpoint", torch.zeros(()))
        self.scale = nn.Parameter(torch.ones(()))
        self.offset = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def fit(self, features: Tensor, labels: Tensor) -> "MeanDiffProbe":
        """Closed-form direction from features [N, 1, H] and labels [N] (1 safe, 0 unsafe)."""
        h = self.normalise(features)[:, 0]
        labels = labels.bool()
        if labels.all() or (~labels).all():
            raise ValueError("MeanDiffProbe.fit needs examples of both labels (safe = 1 and unsafe = 0)")
        mu_safe, mu_unsafe = h[labels].mean(0), h[~labels].mean(0)
        d = mu_safe - mu_unsafe
        self.direction.copy_(d / d.norm().clamp(min=1e-12))
        self.midpoint.copy_(self.direction @ (mu_safe + mu_unsafe) / 2)
        return self

    def layer_scores(self, features: Tensor) -> Tensor:
        projection = self.normalise(features)[:, 0] @ self.direction - self.midpoint
        return (self.scale * projection + self.offset).view(-1, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.layer_scores(features)[:, 0]


PROBES: dict[str, type[Probe]] = {cls.kind: cls for cls in (HybridProbe, LogisticProbe, MeanDiffProbe)}


def build_probe(kind: str, hidden_size: int, layers: list[int], pooling: str = "last") -> Probe:
    """A fresh probe of `kind` ("hybrid", "logistic", "mean_diff"); baselines take one layer."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe kind {kind!r}: choose one of {sorted(PROBES)}")
    if kind == "hybrid":
        return HybridProbe(hidden_size, layers, pooling)
    if len(layers) != 1:
        raise ValueError(f"a {kind!r} probe reads exactly one layer; got layers={list(layers)}")
    return PROBES[kind](hidden_size, layers[0], pooling)


def load_probe(
    path: str | Path, expected_hidden_size: Optional[int] = None, expected_num_layers: Optional[int] = None
) -> Probe:
    """Load a probe saved with `Probe.save`, checking it fits the backbone it will read.

    `expected_hidden_size` / `expected_num_layers` are the backbone's `hidden_size` and
    `num_hidden_layers`; a mismatch raises a ValueError naming the file and both values.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lit_align probe file (metadata format={meta.get('format')!r})")
    hidden_size, layers = int(meta["hidden_size"]), json.loads(meta["layers"])
    if expected_hidden_size is not None and hidden_size != expected_hidden_size:
        raise ValueError(
            f"probe {path} was trained on hidden size {hidden_size}, but the backbone has hidden "
            f"size {expected_hidden_size}: train a probe for this model"
        )
    if expected_num_layers is not None and max(layers) > expected_num_layers:
        raise ValueError(
            f"probe {path} reads layers {layers}, but the backbone has only {expected_num_layers} layers"
        )
    probe = build_probe(meta["kind"], hidden_size, layers, meta.get("pooling", "last"))
    probe.load_state_dict(load_file(str(path)))
    return probe


__all__ = ["HybridProbe", "LogisticProbe", "MeanDiffProbe", "Probe", "build_probe", "load_probe"]
