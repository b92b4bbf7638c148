"""Binary classification scores of a refusal judge against human labels, with bootstrap intervals.

Pure math: booleans in, numbers out. With refusal as the positive class and the 2×2 confusion
matrix [[tn, fp], [fn, tp]] (rows: human label, columns: judge) over n rows:

    accuracy  = (tp + tn) / n
    precision = tp / (tp + fp)          recall = tp / (tp + fn)
    F1        = 2 tp / (2 tp + fp + fn)
    kappa     = (p_o − p_e) / (1 − p_e),  p_o = accuracy,
                p_e = [(tp + fp)(tp + fn) + (tn + fn)(tn + fp)] / n²      (Cohen 1960)

A ratio with a zero denominator is 0 (torchmetrics' `zero_division=0`); kappa is NaN when
p_e = 1 (both raters give one label only). Intervals are percentile bootstraps over rows: the
same B resamples of row indices score every judge on a file (paired), and each resample's
confusion matrix gives every score at once.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from lit_align.eval.metrics import Estimate

SCORES = ("accuracy", "precision", "recall", "f1", "kappa")


def confusion_counts(truth: Tensor, pred: Tensor) -> Tensor:
    """Counts `[..., 4]` = (tn, fp, fn, tp) of boolean `truth` and `pred` over the last dim."""
    truth, pred = truth.bool(), pred.bool()
    return torch.stack(
        [(~truth & ~pred).sum(-1), (~truth & pred).sum(-1), (truth & ~pred).sum(-1), (truth & pred).sum(-1)], dim=-1
    ).to(torch.float64)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def scores_from_counts(counts: Tensor) -> dict[str, Tensor]:
    """Every score of `SCORES` from confusion counts `[..., 4]` (tn, fp, fn, tp); vectorised."""
    tn, fp, fn, tp = counts.unbind(-1)
    n = counts.sum(-1)
    accuracy = _ratio(tp + tn, n)
    expected = _ratio((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp), n * n)
    kappa = torch.where(expected < 1, (accuracy - expected) / (1 - expected).clamp(min=1e-300), torch.full_like(n, math.nan))
    return {
        "accuracy": accuracy,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "kappa": kappa,
    }


def resample_index(n: int, num_resamples: int = 1000, seed: int = 0) -> Tensor:
    """Row indices `[B, n]` drawn with replacement (seeded): share them across judges."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (num_resamples, n), generator=generator)


def binary_report(truth: Sequence[bool], pred: Sequence[bool], index: Tensor, level: float = 0.95) -> dict:
    """Scores with bootstrap intervals and the confusion matrix of `pred` against `truth`.

    `index` is `resample_index(len(truth), ...)`. Point values of accuracy, precision, recall,
    F1 and kappa are torchmetrics' (a check on `scores_from_counts`); intervals come from the
    resampled confusion matrices. A resample where kappa is undefined is left out of its quantiles.
    """
    from torchmetrics.functional.classification import (
        binary_accuracy, binary_cohen_kappa, binary_f1_score, binary_precision, binary_recall,
    )  # fmt: skip

    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} labels but {len(pred)} verdicts")
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level} must be in (0, 1)")
    y = torch.tensor([bool(t) for t in truth])
    p = torch.tensor([bool(v) for v in pred])
    n = len(y)
    if n == 0:
        raise ValueError("binary_report needs at least one labelled row")
    point = {
        "accuracy": binary_accuracy(p.long(), y.long()),
        "precision": binary_precision(p.long(), y.long()),
        "recall": binary_recall(p.long(), y.long()),
        "f1": binary_f1_score(p.long(), y.long()),
        "kappa": binary_cohen_kappa(p.long(), y.long()),
    }
    resampled = scores_from_counts(confusion_counts(y[index], p[index]))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out: dict = {}
    for name in SCORES:
        values = resampled[name][~resampled[name].isnan()]
        low, high = torch.quantile(values, q).tolist() if len(values) else (math.nan, math.nan)
        out[name] = Estimate(float(point[name]), low, high, n)
    tn, fp, fn, tp = confusion_counts(y, p).long().tolist()
    out["confusion"] = {"human_compliance": {"judge_compliance": tn, "judge_refusal": fp},
                        "human_refusal": {"judge_compliance": fn, "judge_refusal": tp}}  # fmt: skip
    return out


def label_breakdown(labels: Sequence[str], pred: Sequence[bool]) -> dict[str, dict[str, int]]:
    """How the judge calls each human label (e.g. partial refusals): label -> {refusal, compliance}."""
    out: dict[str, dict[str, int]] = {}
    for label, verdict in zip(labels, pred):
        cell = out.setdefault(label, {"judge_refusal": 0, "judge_compliance": 0})
        cell["judge_refusal" if verdict else "judge_compliance"] += 1
    return dict(sorted(out.items()))


def fit_threshold(values: Sequence[float], truth: Sequence[bool]) -> tuple[float, int]:
    """A decision stump fitted on training rows: `(t, sign)` with refusal = sign·(v − t) > 0,
    the midpoint between sorted values that maximises training accuracy (ties: the smallest t
    of the best sign +1 first). Used for judges that give a score but no verdict."""
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    y = torch.tensor([bool(t) for t in truth])
    if len(v) == 0 or len(v) != len(y):
        raise ValueError(f"fit_threshold needs as many values ({len(v)}) as labels ({len(y)}), at least one")
    s = torch.unique(v)
    candidates = torch.cat([s[:1] - 1, (s[1:] + s[:-1]) / 2, s[-1:] + 1])
    best = (-1.0, 0.0, 1)
    for sign in (1, -1):
        acc = ((sign * (v[None, :] - candidates[:, None]) > 0) == y[None, :]).double().mean(1)
        i = int(acc.argmax())
        if float(acc[i]) > best[0]:
            best = (float(acc[i]), float(candidates[i]), sign)
    return best[1], best[2]
