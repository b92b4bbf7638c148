"""`lit-align train-shadow`: one Bradley–Terry reward model per harm category (SPEC B2) + manifest.

The seven models are trained one after another, each a plain `RewardModule` run on its own
category's pairs (see docs/srmir.md for why not one multi-head run). The manifest written
next to them maps category -> exported Hugging Face directory:

    {"format": "lit_align.srmir.shadow", "version": 1, "backbone": {...}, "head": ...,
     "categories": {"insult": {"path": "insult", "train_pairs": 40, "val_pairs": 10,
                               "eval_accuracy": 0.9, ...}, ...},
     "splits": {"insult": {"train": "data/insult.train.jsonl", "heldout": "data/insult.heldout.jsonl"}, ...},
     "classifier": "category_classifier.pt"}

Each category's pairs are split once (a seeded permutation, `val_fraction` held out); `pooled:
true` trains one model on the union of the same training splits instead (the paper-B baseline:
one reward model for every category), written as a one-model manifest (`categories: {"pooled":
...}`) that `ShadowRewardEnsemble(strategy="linear")` scores as that model. `heldout_accuracy`
tabulates the pairwise accuracy per category on the held-out pairs (lit_align/srmir/accuracy.py).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_align.models import PolicyConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lit_align.srmir.shadow"
MANIFEST_VERSION = 1


# ---------------------------------------------------------------------------- manifest
def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)  # never a half-written manifest
    return path


def load_manifest(path: str | Path) -> dict:
    """The manifest with absolute model paths; a clear error for anything malformed."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"shadow manifest {path} does not exist (lit-align train-shadow writes it)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: field 'format' must be {MANIFEST_FORMAT!r}; this is not a shadow manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: field 'version' is {manifest.get('version')!r}; this lit_align reads version {MANIFEST_VERSION}")
    categories = manifest.get("categories")
    if not isinstance(categories, dict) or not categories:
        raise ValueError(f"{path}: field 'categories' must map each category to its model entry")
    for category, entry in categories.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"{path}: categories.{category}.path must be the model directory (a string)")
        model_dir = (path.parent / entry["path"]).resolve()
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{path}: categories.{category}.path -> {model_dir} is not a Hugging Face model directory")
        entry["path"] = str(model_dir)
    classifier = manifest.get("classifier")
    if classifier is not None:
        classifier_path = (path.parent / classifier).resolve()
        if not classifier_path.is_file():
            raise ValueError(f"{path}: field 'classifier' -> {classifier_path} does not exist")
        manifest["classifier"] = str(classifier_path)
    manifest["manifest_path"] = str(path.resolve())
    return manifest


# ---------------------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {i + 1}: not valid JSON") from None
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def split_pairs(rows: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out), both in file order: `round(n · val_fraction)` rows of a seeded
    permutation are held out (the split AlignDataModule makes of one file with this seed)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[: int(round(len(rows) * val_fraction))])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def write_splits(per_category: dict[str, Path], categories: list[str], val_fraction: float, seed: int) -> dict:
    """Split each category's pairs once: `<c>.train.jsonl`, `<c>.heldout.jsonl` next to them, and
    their unions `train.jsonl` / `heldout.jsonl` (the pooled model's data). Returns
    {category: {train, heldout, train_pairs, heldout_pairs}} with paths relative to `out_dir`."""
    splits, union = {}, {"train": [], "heldout": []}
    for c in categories:
        train, heldout = split_pairs(read_jsonl(per_category[c]), val_fraction, seed)
        folder = per_category[c].parent
        _write_jsonl(folder / f"{c}.train.jsonl", train)
        _write_jsonl(folder / f"{c}.heldout.jsonl", heldout)
        union["train"] += train
        union["heldout"] += heldout
        splits[c] = {"train": f"{folder.name}/{c}.train.jsonl", "heldout": f"{folder.name}/{c}.heldout.jsonl",
                     "train_pairs": len(train), "heldout_pairs": len(heldout)}
    for name, rows in union.items():
        _write_jsonl(next(iter(per_category.values())).parent / f"{name}.jsonl", rows)
    return splits


def split_by_category(data: Path, out_dir: Path) -> dict[str, Path]:
    """One JSONL per category (the AlignDataModule input for that category's run)."""
    rows = defaultdict(list)
    for i, line in enumerate(data.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{data} line {i + 1}: not valid JSON") from None
        category = row.get("category")
        if not isinstance(category, str) or not category:
            raise ValueError(f"{data} line {i + 1}: field 'category' is missing; shadow models need a category per pair")
        rows[category].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for category, items in sorted(rows.items()):
        paths[category] = out_dir / f"{category}.jsonl"
        paths[category].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    return paths


# ---------------------------------------------------------------------------- training
def train_one(
    category: str, data_path: Path, val_path: Optional[Path], out_dir: Path, backbone: PolicyConfig, head: str,
    margin: float, center_rewards_coefficient: Optional[float], lr: float, weight_decay: float, max_steps: int,
    batch_size: int, max_prompt_length: int, max_completion_length: int, accelerator: str, seed: int,
) -> dict:
    """Fit one RewardModule on `data_path`'s pairs (a category's, or all of them: `pooled`),
    validate on `val_path`'s, export it to `<out_dir>/<category>`, return its manifest entry."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lit_align.data.datamodule import AlignDataModule
    from lit_align.modules.reward import RewardModule

    L.seed_everything(seed, verbose=False)
    n_train = sum(1 for line in data_path.read_text().splitlines() if line.strip())
    if n_train < batch_size:  # small categories still train, on every pair each step
        log.warning("%s: %d training pairs, fewer than batch_size=%d; using batch_size=%d", category, n_train, batch_size, max(n_train, 1))
        batch_size = max(n_train, 1)
    module = RewardModule(
        backbone, head=head, margin=margin, center_rewards_coefficient=center_rewards_coefficient,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
    )
    data = AlignDataModule(
        str(data_path), mode="preference", format="generic", val_path=str(val_path) if val_path else None,
        val_fraction=0.0, batch_size=batch_size,
        max_prompt_length=max_prompt_length, max_completion_length=max_completion_length, seed=seed,
    )
    trainer = L.Trainer(
        max_steps=max_steps, accelerator=accelerator, devices=1, logger=CSVLogger(out_dir / "logs", name=category),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data)
    entry = {"path": category, "train_pairs": len(data.train_set), "val_pairs": len(data.val_set)}
    if data.val_set:
        trainer.limit_val_batches = 1.0
        metrics = trainer.validate(module, dataloaders=data.val_dataloader(), verbose=False)[0]
        entry.update({k: float(v) for k, v in metrics.items() if k.startswith("eval_")})
    module.export(out_dir / category)
    return entry


def check_options(pooled: bool, train_classifier: Optional[bool], compare_with: Optional[str]) -> None:
    """Refuse the option combinations that would do nothing."""
    if compare_with is not None and not pooled:
        raise ValueError("train-shadow: compare_with sets a pooled model beside shadow models; set pooled: true")
    if pooled and train_classifier:
        raise ValueError("train-shadow: pooled: true trains one model that nothing routes to; set train_classifier: false")


def read_categories(data_path: Path, out: Path, categories: Optional[list[str]]) -> tuple[dict[str, Path], list[str]]:
    """`data` split into one JSONL per category under `<out>/data`, and the categories to train."""
    if not data_path.is_file():
        raise FileNotFoundError(f"shadow training data {data_path} does not exist (run lit-align build-cod first)")
    per_category = split_by_category(data_path, out / "data")
    chosen = categories or sorted(per_category)
    missing = [c for c in chosen if c not in per_category]
    if missing:
        raise ValueError(f"{data_path} has no pairs for categories {missing} (it has {sorted(per_category)})")
    return per_category, chosen


def new_manifest(data_path: Path, backbone: PolicyConfig, head: str, pooled: bool, training: dict, splits: dict) -> dict:
    """The manifest before any model is trained: what is trained, how, and on which split."""
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "strategy": "one model on every category's pairs (pooled)" if pooled else "one model per category, sequential runs",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "data": str(data_path.resolve()),
        "backbone": asdict(backbone), "head": head, "categories": {}, "pooled": pooled,
        "training": training, "splits": splits,
    }


def train_models(manifest: dict, out: Path, backbone: PolicyConfig, max_prompt_length: int, max_completion_length: int,
                 accelerator: str) -> None:
    """Train the models the manifest describes (one per category, or one pooled) in turn, entering each when done."""
    t = manifest["training"]
    runs = {"pooled": ("data/train.jsonl", "data/heldout.jsonl")} if manifest["pooled"] else {
        c: (s["train"], s["heldout"]) for c, s in manifest["splits"].items()}
    for name, (train_file, heldout_file) in runs.items():
        heldout = out / heldout_file
        log.info("shadow model %s: training on %s", name, out / train_file)
        manifest["categories"][name] = train_one(
            name, out / train_file, heldout if heldout.read_text().strip() else None, out, backbone, manifest["head"],
            t["margin"], t["center_rewards_coefficient"], t["lr"], t["weight_decay"], t["max_steps"], t["batch_size"],
            max_prompt_length, max_completion_length, accelerator, t["seed"])
        write_manifest(out, manifest)  # a crash later still leaves the finished models usable


def fit_classifier(per_category: dict[str, Path], chosen: list[str], out: Path, seed: int) -> str:
    """Fit the prompt -> category classifier on the chosen categories' prompts; its file name."""
    from lit_align.srmir.classifier import PromptCategoryClassifier

    rows = [r for c in chosen for r in read_jsonl(per_category[c])]
    clf = PromptCategoryClassifier(chosen).fit([r["prompt"] for r in rows], [r["category"] for r in rows], seed=seed)
    clf.save(out / "category_classifier.pt")
    return "category_classifier.pt"


def report_accuracy(manifest: dict, out: Path, compare_with: Optional[str]) -> None:
    """Log each model's held-out accuracy; write the accuracy table when any pairs were held out."""
    from lit_align.srmir.accuracy import heldout_accuracy

    for name, entry in manifest["categories"].items():
        log.info("%s: held-out pairwise accuracy %s on %d pairs", name, entry.get("eval_accuracy"), entry["val_pairs"])
    if any(s["heldout_pairs"] for s in manifest["splits"].values()):
        heldout_accuracy([compare_with, str(out)] if compare_with else [str(out)], str(out))


def train_shadow(
    data: str, out_dir: str, backbone: PolicyConfig,
    head: Literal["sequence_classification", "last_token"] = "sequence_classification",
    categories: Optional[list[str]] = None, margin: float = 0.0, center_rewards_coefficient: Optional[float] = 0.01,
    lr: float = 5e-5, weight_decay: float = 0.0, max_steps: int = 50, batch_size: int = 8, val_fraction: float = 0.2,
    max_prompt_length: int = 256, max_completion_length: int = 128, accelerator: str = "auto",
    train_classifier: Optional[bool] = None, seed: int = 0,
    pooled: bool = False, pooled_max_steps: Optional[int] = None, compare_with: Optional[str] = None,
) -> dict:
    """Train one shadow reward model per category and write `<out_dir>/manifest.json` (SPEC B2).

    Args:
        data: The build-cod JSONL (prompt, category, chosen, rejected).
        out_dir: Where the models (one Hugging Face directory per category), logs and manifest go.
        backbone: The pretrained backbone of every shadow model (LoRA when `backbone.lora` is set).
        head: "sequence_classification" or "last_token" (see RewardModule).
        categories: Categories to train; None: every category in `data`.
        margin: Bradley–Terry margin m.
        center_rewards_coefficient: η of the centering term (keeps the models on one scale for the linear
            ensemble); None: off.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_steps: Optimiser steps per category.
        batch_size: Pairs per step.
        val_fraction: Pairs of each category held out (the same seeded split for the per-category and the
            pooled models) for the pairwise accuracy table.
        max_prompt_length: Prompt tokens kept.
        max_completion_length: Response tokens kept.
        accelerator: Lightning accelerator ("auto", "cpu", "gpu").
        train_classifier: Also fit the prompt -> category classifier the categorized ensemble uses for
            prompts without a category; None: yes, unless `pooled` (nothing routes).
        seed: Seed for the splits, initialisation and shuffling.
        pooled: Train ONE model on the union of every category's training split (a single reward model for
            all categories) instead of one per category; manifest `categories: {pooled: ...}`.
        pooled_max_steps: Optimiser steps of the pooled model; None: `max_steps` × the number of categories
            (the per-category models' steps together: the same training compute).
        compare_with: With `pooled`: the per-category run's manifest (same data, categories, val_fraction and seed,
            hence the same held-out pairs: checked); the accuracy table then sets the pooled model beside the shadow models.

    Returns:
        The manifest (also written to `<out_dir>/manifest.json`); `<out_dir>/heldout_accuracy.{json,md}`
        hold the held-out pairwise accuracy per category.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_options(pooled, train_classifier, compare_with)
    data_path, out = Path(data), Path(out_dir)
    per_category, chosen = read_categories(data_path, out, categories)
    steps = (pooled_max_steps or max_steps * len(chosen)) if pooled else max_steps
    training = dict(margin=margin, center_rewards_coefficient=center_rewards_coefficient, lr=lr, weight_decay=weight_decay,
                    max_steps=steps, batch_size=batch_size, val_fraction=val_fraction, seed=seed)
    manifest = new_manifest(data_path, backbone, head, pooled, training, write_splits(per_category, chosen, val_fraction, seed))
    train_models(manifest, out, backbone, max_prompt_length, max_completion_length, accelerator)
    if (not pooled if train_classifier is None else train_classifier) and len(chosen) > 1:
        manifest["classifier"] = fit_classifier(per_category, chosen, out, seed)
    write_manifest(out, manifest)
    report_accuracy(manifest, out, compare_with)
    return manifest
