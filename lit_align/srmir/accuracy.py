"""Held-out pairwise accuracy per category of the shadow reward models, a pooled model and the ensembles.

For a category c with held-out pairs (x_i, y_i^+, y_i^-), i = 1..n_c, and a reward R:

    accuracy_c(R) = (1/n_c) Σ_i 1[R(x_i, y_i^+) > R(x_i, y_i^-)]

(TRL's reward `accuracy`: a tie counts as wrong), with a bootstrap interval. The rewards are the
ones GRPO sees (each model a `SequenceClassifierReward`, texts rendered as in training):

* from a per-category manifest: "categorized" (each pair scored by its own category's model,
  R_{c(x)}), "linear" (Σ_j w_j R_j with the ensemble's weights, uniform 1/K) and every model
  alone on every category (the K × K table);
* from a pooled manifest (`train-shadow --pooled true`): "pooled" (its one model).

Every manifest must hold out the same pairs (same data, categories, val_fraction and seed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from lit_align.srmir.shadow import load_manifest, read_jsonl

TABLE = "heldout_accuracy"


def heldout_pairs(manifest: dict) -> dict[str, list[dict]]:
    """category -> its held-out pairs, from the split files train-shadow wrote."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"{manifest['manifest_path']}: no field 'splits' (the held-out pairs); re-run train-shadow")
    root = Path(manifest["manifest_path"]).parent
    return {c: read_jsonl(root / s["heldout"]) for c, s in splits.items()}


def _key(row: dict) -> tuple:
    return row.get("prompt"), row.get("chosen"), row.get("rejected")


def check_same_pairs(first: dict, other: dict, where: tuple[str, str]) -> None:
    a = {c: sorted(map(_key, rows)) for c, rows in first.items()}
    b = {c: sorted(map(_key, rows)) for c, rows in other.items()}
    if a != b:
        differ = sorted(c for c in set(a) | set(b) if a.get(c) != b.get(c))
        raise ValueError(
            f"{where[1]} holds out other pairs than {where[0]} (categories {differ}): train both with the same "
            "data, categories, val_fraction and seed, so that their accuracies are on the same pairs"
        )


def model_scores(manifest: dict, prompts: list, chosen: list, rejected: list) -> dict[str, tuple]:
    """Each model's rewards of the chosen and rejected answers, and the ensemble's weights."""
    from lit_align.srmir.ensemble import ShadowRewardEnsemble

    ensemble = ShadowRewardEnsemble(manifest["manifest_path"], strategy="linear", use_classifier=False)
    scores = {c: (torch.tensor(m(prompts, chosen)), torch.tensor(m(prompts, rejected))) for c, m in ensemble.models.items()}
    return {"scores": scores, "weights": ensemble.weights}


def correct(pair: tuple) -> list[float]:
    chosen, rejected = pair
    return (chosen > rejected).float().tolist()


def heldout_accuracy(
    manifests: list[str], out_dir: Optional[str] = None, num_resamples: int = 1000, level: float = 0.95, seed: int = 0,
) -> dict:
    """The accuracy table of the rewards in `manifests` (per-category and / or pooled train-shadow
    runs) on their common held-out pairs; written to `<out_dir>/heldout_accuracy.{json,md}`."""
    from lit_align.eval.metrics import estimate, to_jsonable

    loaded = [load_manifest(m) for m in manifests]
    pairs = heldout_pairs(loaded[0])
    for m in loaded[1:]:
        check_same_pairs(pairs, heldout_pairs(m), (loaded[0]["manifest_path"], m["manifest_path"]))
    rows = [(c, r) for c, rs in pairs.items() for r in rs]
    cats = [c for c, _ in rows]
    prompts, chosen, rejected = ([r[k] for _, r in rows] for k in ("prompt", "chosen", "rejected"))
    rewards, matrix = {}, {}
    for m in loaded:
        out = model_scores(m, prompts, chosen, rejected)
        scores, weights = out["scores"], out["weights"]
        if m.get("pooled"):
            rewards["pooled" if "pooled" not in rewards else f"pooled_{len(rewards)}"] = correct(scores["pooled"])
            continue
        own = [c if c in scores else None for c in cats]
        if None in own:
            raise ValueError(f"{m['manifest_path']}: held-out pairs of a category without a model")
        rewards["categorized"] = [correct(scores[c])[i] for i, c in enumerate(own)]
        rewards["linear"] = correct(tuple(sum(weights[c] * scores[c][k] for c in scores) for k in (0, 1)))
        matrix = {c: correct(pair) for c, pair in scores.items()}
    kw = dict(num_resamples=num_resamples, level=level, seed=seed)
    by_cat = lambda values, c: estimate([v for v, k in zip(values, cats) if k == c], **kw)  # noqa: E731
    table = {
        "manifests": [m["manifest_path"] for m in loaded],
        "categories": {c: {"n": len(pairs[c]), "rewards": {n: by_cat(v, c) for n, v in rewards.items()}}
                       for c in pairs if pairs[c]},
        "all": {"n": len(rows), "rewards": {n: estimate(v, **kw) for n, v in rewards.items()}},
        "models": {model: {c: by_cat(v, c) for c in pairs if pairs[c]} for model, v in matrix.items()},
    }
    table["worst"] = {
        n: min(((c, e["rewards"][n]) for c, e in table["categories"].items()), key=lambda ce: ce[1].value)
        for n in rewards
    }
    table = to_jsonable(table)
    if out_dir is not None:
        out = Path(out_dir)
        (out / f"{TABLE}.json").write_text(json.dumps(table, indent=1))
        (out / f"{TABLE}.md").write_text(markdown(table))
    return table


def _cell(e: dict) -> str:
    return "–" if e["n"] == 0 else f"{100 * e['value']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"


def markdown(table: dict) -> str:
    names = list(table["all"]["rewards"])
    out = [
        "# Held-out pairwise accuracy of the reward models", "",
        "Share of held-out CoD pairs (never trained on) whose chosen answer the reward scores above the rejected one, "
        "[95% bootstrap interval]. categorized: each pair by its own category's shadow model; linear: the mean of the "
        "shadow models; pooled: one model trained on every category's pairs.", "",
        "| category | held-out pairs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
    ]
    for c, e in table["categories"].items():
        out.append(f"| {c} | {e['n']} | " + " | ".join(_cell(e["rewards"][n]) for n in names) + " |")
    out.append(f"| all | {table['all']['n']} | " + " | ".join(_cell(table["all"]["rewards"][n]) for n in names) + " |")
    worst = table["worst"]
    out.append("| worst category | | " + " | ".join(f"{worst[n][0]}: {_cell(worst[n][1])}" for n in names) + " |")
    if table["models"]:
        cats = list(table["categories"])
        out += ["", "## Each shadow model on each category's held-out pairs", "",
                "| pairs of \\ model | " + " | ".join(table["models"]) + " |", "|---|" + "---|" * len(table["models"])]
        out += [f"| {c} | " + " | ".join(_cell(table["models"][m][c]) for m in table["models"]) + " |" for c in cats]
    return "\n".join(out) + "\n"


__all__ = ["heldout_accuracy", "heldout_pairs"]
