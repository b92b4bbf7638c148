"""Which layers carry the safety signal: a per-layer AUROC table for a trained probe.

For every layer the probe reads, three numbers on held-out features:
* `probe_layer_auroc`: AUROC of the probe's own per-layer score s_l (HybridProbe) — or of
  the whole score for one-layer probes;
* `mean_diff_auroc`: AUROC of a mean-difference direction fitted on the training features
  of that layer alone (a training-free baseline);
* for pairs, `*_pairwise_accuracy`: fraction of held-out pairs with s_c > s_r.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from lit_align.probes.probe import MeanDiffProbe, Probe


def _auroc(scores: Tensor, labels: Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(scores.float(), labels.long()))


@torch.no_grad()
def per_layer_table(
    probe: Probe,
    train_features: Tensor,
    train_labels: Tensor,
    eval_features: Tensor,
    eval_labels: Tensor,
    eval_pairs: Optional[int] = None,
) -> list[dict]:
    """One row per probe layer (see the module docstring).

    Labels are 1 safe / 0 unsafe. For pair data pass the chosen rows then the rejected rows
    (`eval_pairs` = number of pairs) to also get pairwise accuracies.
    """
    probe.eval()
    layer_scores = probe.layer_scores(eval_features)
    rows = []
    for i, layer in enumerate(probe.layers):
        baseline = MeanDiffProbe(probe.hidden_size, layer)
        baseline.set_feature_stats(train_features[:, i : i + 1])
        baseline.fit(train_features[:, i : i + 1], train_labels)
        base_scores = baseline(eval_features[:, i : i + 1])
        row = {
            "layer": layer,
            "probe_layer_auroc": _auroc(layer_scores[:, i], eval_labels),
            "mean_diff_auroc": _auroc(base_scores, eval_labels),
        }
        if eval_pairs is not None:
            row["probe_layer_pairwise_accuracy"] = float((layer_scores[:eval_pairs, i] > layer_scores[eval_pairs:, i]).float().mean())
            row["mean_diff_pairwise_accuracy"] = float((base_scores[:eval_pairs] > base_scores[eval_pairs:]).float().mean())
        rows.append(row)
    return rows


def write_table(rows: list[dict], out_dir: str | Path, stem: str = "per_layer_auroc", note: str = "") -> tuple[Path, Path]:
    """Write `rows` as `{stem}.csv` and `{stem}.md` under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"<!-- {note} -->"] if note else []
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


__all__ = ["per_layer_table", "write_table"]
