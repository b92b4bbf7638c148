"""A small prompt -> harm-category classifier: hashed bag of words + logistic regression.

Used where a prompt arrives without a category: the `categorized` ensemble routes it to the
predicted category's shadow model, and `build-cod` can label sources that have no category
column (AdvBench) from the labelled ones. Written in torch to add no dependency:

    x = normalize(log(1 + counts of hashed unigrams and bigrams)),  p(c | x) = softmax(W x + b)
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

_WORD = re.compile(r"[a-z0-9']+")


def hashed_features(texts: Sequence[str], num_features: int) -> torch.Tensor:
    """[N, num_features] log-count features of lower-cased unigrams and bigrams, L2-normalised."""
    x = torch.zeros(len(texts), num_features)
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        for g in grams:
            x[i, zlib.crc32(g.encode()) % num_features] += 1.0  # crc32: stable across runs
    return F.normalize(torch.log1p(x), dim=1)


class PromptCategoryClassifier:
    """Multinomial logistic regression on hashed bag-of-words features."""

    def __init__(self, categories: Sequence[str], num_features: int = 4096):
        self.categories = list(categories)
        self.num_features = num_features
        self.linear = torch.nn.Linear(num_features, len(self.categories))

    def fit(
        self, prompts: Sequence[str], categories: Sequence[str], steps: int = 300, lr: float = 0.1,
        weight_decay: float = 1e-4, seed: int = 0,
    ) -> "PromptCategoryClassifier":
        """Full-batch Adam on cross-entropy; categories unknown to the classifier are an error."""
        unknown = sorted(set(categories) - set(self.categories))
        if unknown:
            raise ValueError(f"training categories {unknown} are not among {self.categories}")
        torch.manual_seed(seed)
        self.linear.reset_parameters()
        x = hashed_features(prompts, self.num_features)
        y = torch.tensor([self.categories.index(c) for c in categories])
        opt = torch.optim.Adam(self.linear.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(self.linear(x), y).backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict_proba(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.linear(hashed_features(prompts, self.num_features)).softmax(-1)

    def predict(self, prompts: Sequence[str]) -> list[str]:
        if not prompts:
            return []
        return [self.categories[int(i)] for i in self.predict_proba(prompts).argmax(-1)]

    def save(self, path: str | Path) -> Path:
        """`path` (.pt): the weights plus the category list and feature size."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"categories": self.categories, "num_features": self.num_features, "state": self.linear.state_dict()},
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PromptCategoryClassifier":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("categories", "num_features", "state"):
            if key not in blob:
                raise ValueError(f"{path}: not a PromptCategoryClassifier file (missing {key!r})")
        clf = cls(blob["categories"], blob["num_features"])
        clf.linear.load_state_dict(blob["state"])
        return clf
