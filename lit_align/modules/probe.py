"""ProbeModule: train a reward probe on a frozen backbone's hidden states (paper A, SPEC A1).

    setup:  features = frozen_backbone(texts)[layers] at the last token   # once, cached on disk
    step:   scores = probe(features[batch.index])
            loss   = bce(scores, labels)                 # labelled texts (1 safe / 0 unsafe)
                   | −log σ(s_c − s_r − m)               # preference pairs
    end:    probe file + per-layer AUROC table in the run directory

The backbone is loaded only to extract features and then freed: checkpoints hold the probe.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from lit_align.checks import ConfigError, check_range
from lit_align.losses.probe import bce_loss, pairwise_margin_loss
from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer, resolve_name
from lit_align.modules.base import AlignModule
from lit_align.probes.features import cached_features, resolve_layers
from lit_align.probes.probe import PROBES, MeanDiffProbe, build_probe
from lit_align.probes.report import per_layer_table, write_table

log = logging.getLogger(__name__)


def default_probe_optimizer(params) -> torch.optim.Optimizer:
    """The paper's probe setting: Adam, lr 1e-3, weight decay 0.01."""
    return torch.optim.Adam(params, lr=1e-3, weight_decay=0.01)


class ProbeModule(AlignModule):
    """A probe (HybridProbe or a baseline) trained on cached features of a frozen backbone.

    Args:
        backbone: The model whose hidden states are probed (normally the policy DPO will train).
        kind: "hybrid" (per-layer probes + vote gate), "logistic" (one layer) or "mean_diff" (one layer).
        layers: Hidden-state indices to read (1..L; negative count from the end); None = all layers.
            "logistic" and "mean_diff" need exactly one.
        pooling: "last" (last non-padding token, the paper) or "mean".
        loss: "auto" (BCE for labelled data, pairwise for pairs), "bce" or "pairwise".
        margin: Margin m of the pairwise loss −log σ(s_c − s_r − m).
        feature_batch_size: Texts per backbone forward while extracting features.
        cache_dir: Where features are cached (default ~/.cache/lit_align/features).
        probe_path: Where to save the trained probe (default: probe.safetensors in the run directory).
        optimizer: Optimiser for the probe (default Adam, lr 1e-3, weight decay 0.01).
        lr_scheduler: Optional scheduler, stepped every optimiser step.
    """

    def __init__(
        self,
        backbone: PolicyConfig,
        kind: Literal["hybrid", "logistic", "mean_diff"] = "hybrid",
        layers: Optional[list[int]] = None,
        pooling: Literal["last", "mean"] = "last",
        loss: Literal["auto", "bce", "pairwise"] = "auto",
        margin: float = 1.0,
        feature_batch_size: int = 16,
        cache_dir: Optional[str] = None,
        probe_path: Optional[str] = None,
        optimizer: OptimizerCallable = default_probe_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__()
        from transformers import AutoConfig

        if kind not in PROBES:
            raise ConfigError(f"model.kind={kind!r}: choose one of {sorted(PROBES)}")
        if loss not in ("auto", "bce", "pairwise"):
            raise ConfigError(f"model.loss={loss!r}: choose auto, bce or pairwise")
        check_range("model.margin", margin, 0, why="a negative margin accepts pairs scored the wrong way round")
        check_range("model.feature_batch_size", feature_batch_size, 1)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        config = AutoConfig.from_pretrained(resolve_name(backbone.name_or_path), revision=backbone.revision)
        config = getattr(config, "text_config", None) or config
        self.backbone_config = backbone
        self.layers = resolve_layers(layers, config.num_hidden_layers)
        self.probe = build_probe(kind, config.hidden_size, self.layers, pooling)
        self.loss_name, self.margin = loss, margin
        self.feature_batch_size, self.cache_dir, self.probe_path = feature_batch_size, cache_dir, probe_path
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.tokenizer = load_tokenizer(backbone)
        self.features: dict[str, dict[str, Tensor]] = {}  # split -> side ("text"/"chosen"/"rejected") -> [N, n, H]
        self.labels: dict[str, Tensor] = {}
        self.reused: dict[str, bool] = {}
        self.mode: Optional[str] = None
        self.val_accuracy, self.val_auroc = BinaryAccuracy(), BinaryAUROC()
        self.val_pairwise_accuracy = MeanMetric()

    # ------------------------------------------------------------------ features
    def setup(self, stage: Optional[str] = None) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_set"):
            raise ConfigError("ProbeModule trains on an AlignDataModule (data: in the config)")
        if datamodule.mode not in ("labeled", "preference"):
            raise ConfigError(f"ProbeModule needs data.mode labeled or preference, got {datamodule.mode!r}")
        self.mode = datamodule.mode
        if self.loss_name == "pairwise" and self.mode == "labeled":
            raise ConfigError("model.loss=pairwise needs preference data (data.mode=preference)")
        if not self.features:
            self.extract(datamodule)

    def extract(self, datamodule) -> None:
        """Run the frozen backbone once over every split and side; cache on disk."""
        device = self.trainer.strategy.root_device
        backbone = load_causal_lm(self.backbone_config, with_lora=False).to(device).requires_grad_(False)
        pad = self.tokenizer.pad_token_id
        sides = {"labeled": {"text": lambda e: e["input_ids"]}, "preference": {
            "chosen": lambda e: e["prompt_ids"] + e["chosen_ids"], "rejected": lambda e: e["prompt_ids"] + e["rejected_ids"]}}
        for split, examples in (("train", datamodule.train_set), ("val", datamodule.val_set)):
            if not examples:
                continue
            assert [e["index"] for e in examples] == list(range(len(examples)))
            self.features[split] = {}
            for side, ids_of in sides[self.mode].items():
                feats, reused = cached_features(
                    backbone, [ids_of(e) for e in examples], self.layers, self.probe.pooling, cache_dir=self.cache_dir,
                    batch_size=self.feature_batch_size, pad_token_id=pad, desc=f"features {split}/{side}",
                )
                self.features[split][side] = feats
                self.reused[f"{split}/{side}"] = reused
            if self.mode == "labeled":
                self.labels[split] = torch.tensor([float(e["label"]) for e in examples])
        del backbone
        train_feats, train_labels = self.flat("train")
        self.probe.set_feature_stats(train_feats)
        if isinstance(self.probe, MeanDiffProbe):
            self.probe.fit(train_feats, train_labels)

    def flat(self, split: str) -> tuple[Tensor, Tensor]:
        """All features of a split with 1/0 labels (pairs: chosen rows, then rejected rows)."""
        feats = self.features[split]
        if self.mode == "labeled":
            return feats["text"], self.labels[split]
        n = len(feats["chosen"])
        return torch.cat([feats["chosen"], feats["rejected"]]), torch.cat([torch.ones(n), torch.zeros(n)])

    # ------------------------------------------------------------------ loss
    def scores(self, batch: dict, split: str) -> dict[str, Tensor]:
        """Probe scores for the batch's rows, from the cached features."""
        index = batch["index"].cpu()
        return {side: self.probe(f[index].to(self.device)) for side, f in self.features[split].items()}

    def compute_loss(self, batch: dict, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, scores by side); override to change the objective."""
        scores = self.scores(batch, split)
        if self.mode == "labeled":
            return bce_loss(scores["text"], batch["label"]), scores
        if self.loss_name == "bce":
            both = torch.cat([scores["chosen"], scores["rejected"]])
            targets = torch.cat([torch.ones_like(scores["chosen"]), torch.zeros_like(scores["rejected"])])
            return bce_loss(both, targets), scores
        loss, _, _ = pairwise_margin_loss(scores["chosen"], scores["rejected"], self.margin)
        return loss, scores

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _ = self.compute_loss(batch, "train")
        self.log("loss", loss.detach(), prog_bar=True, batch_size=len(batch["index"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, scores = self.compute_loss(batch, "val")
        size = len(batch["index"])
        self.log("eval_loss", loss, prog_bar=True, batch_size=size)
        if self.mode == "labeled":
            probs, targets = torch.sigmoid(scores["text"]), batch["label"].long()
        else:
            s_c, s_r = scores["chosen"], scores["rejected"]
            probs = torch.sigmoid(torch.cat([s_c, s_r]))
            targets = torch.cat([torch.ones_like(s_c), torch.zeros_like(s_r)]).long()
            self.val_pairwise_accuracy.update((s_c > s_r).float())
            self.log("eval_pairwise_accuracy", self.val_pairwise_accuracy, batch_size=size)
        self.val_accuracy.update(probs, targets)
        self.val_auroc.update(probs, targets)
        self.log("eval_accuracy", self.val_accuracy, batch_size=size)
        self.log("eval_auroc", self.val_auroc, prog_bar=True, batch_size=size)

    # ------------------------------------------------------------------ outputs
    def run_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        out = self.run_dir()
        path = self.probe.save(self.probe_path or out / "probe.safetensors")
        split = "val" if "val" in self.features else "train"
        train_feats, train_labels = self.flat("train")
        eval_feats, eval_labels = self.flat(split)
        pairs = len(self.features[split]["chosen"]) if self.mode == "preference" else None
        probe = copy.deepcopy(self.probe).cpu()
        rows = per_layer_table(probe, train_feats, train_labels, eval_feats, eval_labels, pairs)
        with torch.no_grad():
            full = torch.sigmoid(probe(eval_feats))
        from torchmetrics.functional.classification import binary_auroc

        rows.append({k: "" for k in rows[0]} | {"layer": "all", "probe_layer_auroc": float(binary_auroc(full, eval_labels.long()))})
        note = f"{type(probe).__name__} on {self.backbone_config.name_or_path}, {split} split, {len(eval_labels)} texts"
        csv_path, _ = write_table(rows, out, note=note)
        log.info("saved the probe to %s and the per-layer AUROC table to %s", path, csv_path)


__all__ = ["ProbeModule", "default_probe_optimizer"]
