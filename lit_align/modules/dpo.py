"""DPOModule: off-policy preference optimisation, with optional probe re-ranking (paper A).

One training step:

    logps, hidden = policy(chosen ⊕ rejected)            # one concatenated forward
    ref_logps     = reference(chosen ⊕ rejected)         # no_grad / adapters off / disk cache
    s_c, s_r      = probe(hidden)                        # features detached; only with a probe
    decision      = reranker(batch, s_c, s_r)            # PairDecision: γ, flips, drops (paper A2)
    loss          = mean_keep( dpo_loss(orient(logps), orient(ref_logps), γ) ) [+ sft_weight · NLL(chosen)]
                    [+ probe co-training loss, stepped by the probe's own Adam]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional, get_args

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.checks import ConfigError, check_range
from lit_align.data.rerank import DECISION_KEY, PairDecision, ReRanker, check_reranking
from lit_align.losses.dpo import DPO_LOSSES, LossType, dpo_loss, sft_loss
from lit_align.losses.logps import token_logps
from lit_align.losses.probe import pairwise_margin_loss
from lit_align.models import PolicyConfig, cache_root, takes_logits_to_keep
from lit_align.modules.base import default_optimizer
from lit_align.modules.packing import packed_sequence_logps, supports_packing
from lit_align.modules.policy import PolicyModule
from lit_align.modules.refcache import ReferenceCache

log = logging.getLogger(__name__)

Reference = Literal["copy", "lora_base", "cached"]
REFERENCES: tuple[str, ...] = get_args(Reference)


def check_dpo_numbers(beta, label_smoothing, sft_weight, probe_lr, probe_weight_decay, probe_margin) -> None:
    """Refuse numbers that would invert or silence DPO's objective."""
    check_range("model.beta", beta, 0, low_open=True, why="a negative β inverts the preference; 0 ignores it")
    check_range("model.label_smoothing", label_smoothing, 0, 0.5, high_open=True,
                why="it is the assumed rate of flipped labels; at 0.5 or more the labels carry no preference")
    check_range("model.sft_weight", sft_weight, 0, why="a negative weight would push the chosen answers down")
    check_range("model.probe_lr", probe_lr, 0, low_open=True, why="0 would not train the probe")
    check_range("model.probe_weight_decay", probe_weight_decay, 0)
    check_range("model.probe_margin", probe_margin, 0)


class DPOModule(PolicyModule):
    """Direct Preference Optimisation on AlignDataModule preference batches.

    Args:
        policy: The model to train (and its tokenizer); LoRA when `policy.lora` is set.
        loss_type: "sigmoid" (DPO), "ipo", "hinge", "robust" or "conservative" (cDPO with the
            re-ranker's confidence γ, or 1 − label_smoothing without one). Only "conservative"
            reads γ; every loss honours the re-ranker's flips and drops.
        beta: Strength of the implicit KL penalty (temperature of the implicit reward); > 0.
        label_smoothing: Assumed label-noise rate ε, 0 ≤ ε < 0.5, for "robust" and "conservative"
            (an error with the other losses, which ignore it, as TRL's sigmoid loss does; "conservative"
            is cDPO, the older TRL sigmoid loss with label smoothing, which TRL 1.16 no longer applies).
        sft_weight: Weight of an added NLL term on the chosen completions (RPO; TRL's
            `loss_type=[<loss>, "sft"]` with `loss_weights=[1, sft_weight]`); 0 turns it off.
        reference: Where reference log-probs come from: "copy" (a frozen second model),
            "lora_base" (the policy with its adapters disabled, no second copy; needs LoRA) or
            "cached" (computed once before training and stored on disk under a fingerprint of
            model + data + tokenisation, reused by later runs).
        reference_cache_dir: Where "cached" reference log-probs live (default ~/.cache/lit_align/ref_logps).
        probe_path: A probe file (lit_align.probes) scoring the policy's own hidden states; its
            scores drive the DataModule's re-ranker (`data.reranker`, needed; paper A2).
        co_train_probe: Also train the probe every step on the dataset labels,
            −log σ(s_c − s_r − probe_margin), with its own Adam optimiser (paper A2), which the
            policy's scheduler and gradient clipping do not touch.
        probe_lr: Learning rate of the probe's Adam (default 1e-2, the paper's); only with co_train_probe.
        probe_weight_decay: Weight decay (L2) of the probe's Adam (default 0.01, the paper's); only with co_train_probe.
        probe_margin: Margin m of the probe's pairwise loss (default 1.0); only with co_train_probe.
        export_dir: Save the trained policy here as a Hugging Face directory when fit ends.
        merge_lora: Export a LoRA policy merged into its base (else as an adapter).
        packing: Compute log-probs without padding — each pair's prompt once, shared by its chosen
            and rejected completions through the attention mask (else sequences packed into dense
            rows) — and the LM head only on completion tokens: the same values for less compute
            (lit_align.modules.packing). Off, or for models it does not support, the padded forward runs.
        optimizer: Optimiser for the policy, e.g. {class_path: torch.optim.AdamW, init_args: {lr: 5e-7}}.
        lr_scheduler: Optional scheduler, stepped every optimiser step.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        loss_type: LossType = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference: Reference = "copy",
        reference_cache_dir: Optional[str] = None,
        probe_path: Optional[str] = None,
        co_train_probe: bool = False,
        probe_lr: Optional[float] = None,
        probe_weight_decay: Optional[float] = None,
        probe_margin: Optional[float] = None,
        export_dir: Optional[str] = None,
        merge_lora: bool = True,
        packing: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__()
        if loss_type not in DPO_LOSSES:
            raise ConfigError(f"model.loss_type={loss_type!r}: choose one of {tuple(DPO_LOSSES)}")
        if reference not in REFERENCES:
            raise ConfigError(f"model.reference={reference!r}: choose one of {REFERENCES}")
        if co_train_probe and probe_path is None:
            raise ConfigError("model.co_train_probe needs model.probe_path (the probe file to co-train)")
        check_dpo_numbers(beta, label_smoothing, sft_weight, probe_lr, probe_weight_decay, probe_margin)
        if label_smoothing and not DPO_LOSSES[loss_type].reads_label_smoothing:
            readers = [k for k, v in DPO_LOSSES.items() if v.reads_label_smoothing]
            readers = " and ".join([", ".join(readers[:-1]), readers[-1]] if len(readers) > 1 else readers)
            raise ConfigError(
                f"model.label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r}: only {readers} "
                "read it (TRL's sigmoid loss ignores label_smoothing; the label-noise-aware losses are "
                "loss_type: robust, or conservative for cDPO)"
            )
        probe_settings = {"probe_lr": probe_lr, "probe_weight_decay": probe_weight_decay, "probe_margin": probe_margin}
        unused = [f"model.{k}" for k, v in probe_settings.items() if v is not None]
        if unused and not co_train_probe:
            raise ConfigError(
                f"{', '.join(unused)} set, but model.co_train_probe is false, so the probe is not trained: "
                f"set model.co_train_probe: true or remove {', '.join(unused)}"
            )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.init_policy(policy, reference, export_dir, merge_lora, optimizer, lr_scheduler)
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.sft_weight = sft_weight
        self.reference_cache_dir = Path(reference_cache_dir) if reference_cache_dir else cache_root() / "ref_logps"
        self.probe_path, self.co_train_probe = probe_path, co_train_probe
        self.probe_lr = 1e-2 if probe_lr is None else probe_lr
        self.probe_weight_decay = 0.01 if probe_weight_decay is None else probe_weight_decay
        self.probe_margin = 1.0 if probe_margin is None else probe_margin
        self.packing = packing
        self.probe = None
        self.ref_cache: Optional[ReferenceCache] = None

    # ------------------------------------------------------------------ models
    def configure_extras(self) -> None:
        if self.probe_path is not None:
            from lit_align.probes import load_probe

            self.probe = load_probe(self.probe_path, expected_hidden_size=self.policy.config.hidden_size)
            self.probe.requires_grad_(self.co_train_probe)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_reranker(self.reranker)

    def check_reranker(self, reranker: ReRanker) -> None:
        """Refuse, at set-up, a re-ranker, probe or γ that would silently do nothing."""
        reads_confidence = DPO_LOSSES[self.loss_type].reads_confidence
        honours = ("flip", "keep", "confidence") if reads_confidence else ("flip", "keep")
        check_reranking(
            reranker, type(self).__name__, honours, has_scores=self.probe_path is not None,
            scores_hint="set model.probe_path to a probe trained on this policy's hidden states "
            "(lit-align fit -c configs/probe.yaml), or use a re-ranker that scores pairs itself",
            ignored_hint=f"model.loss_type={self.loss_type!r} ignores the confidence γ (only 'conservative' "
            "reads it): set model.loss_type: conservative, or use action: flip or action: drop",
        )
        if reads_confidence and self.label_smoothing and "confidence" in reranker.effects():
            raise ConfigError(
                f"model.label_smoothing={self.label_smoothing} would not act in training: the re-ranker's γ replaces "
                "1 − label_smoothing as the conservative loss's confidence; remove model.label_smoothing"
            )

    # ------------------------------------------------------------------ optimisers
    def side_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The co-trained probe's own Adam (SPEC A2: lr 1e-2, weight decay 0.01), apart from the
        policy's optimiser: no scheduler, no clipping; stepped with every policy step (AlignModule)."""
        if self.probe is None or not self.co_train_probe:
            return {}
        return {"probe": torch.optim.Adam(self.probe.parameters(), lr=self.probe_lr, weight_decay=self.probe_weight_decay)}

    @property
    def probe_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return (getattr(self, "_side_optimizers", None) or {}).get("probe")

    # ------------------------------------------------------------------ log-probs
    def _logits_to_keep(self, model, completion_mask: Tensor) -> dict:
        """Compute LM-head logits only from the first completion token on (prompts are long)."""
        if not takes_logits_to_keep(model):
            return {}
        first = int(completion_mask.int().argmax(dim=1).min())
        return {"logits_to_keep": completion_mask.shape[1] - max(first - 1, 0)}

    def sequence_logps(
        self, model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, output_hidden_states: bool = False
    ):
        """Summed completion log-probs [N] (and all hidden states when asked) in one forward."""
        if self.packing and supports_packing(model):
            return packed_sequence_logps(model, input_ids, attention_mask, completion_mask, output_hidden_states)
        keep = self._logits_to_keep(model, completion_mask)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            **keep,
        )
        k = out.logits.shape[1]
        labels = input_ids[:, -k + 1 :] if k > 1 else input_ids[:, :0]
        logps = token_logps(out.logits[:, :-1], labels)
        mask = completion_mask[:, -k + 1 :].to(logps.dtype)
        return (logps * mask).sum(-1), (out.hidden_states if output_hidden_states else None)

    @staticmethod
    def concatenated(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen rows then rejected rows: [2B, T] (the collator pads both to one length)."""
        return tuple(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "completion_mask"))

    @torch.no_grad()
    def reference_logps(self, batch: dict, split: str) -> tuple[Tensor, Tensor]:
        if self.ref_cache is not None:
            return self.ref_cache.lookup(split, batch["index"], self.device)
        with self.reference_model() as reference:
            logps, _ = self.sequence_logps(reference, *self.concatenated(batch))
        return logps.chunk(2)

    def on_fit_start(self) -> None:
        if self.reference_mode == "cached":
            self.ref_cache = ReferenceCache(self, self.trainer.datamodule, self.reference_cache_dir)
            self.ref_cache.prepare(resuming=self.trainer.ckpt_path is not None)

    # ------------------------------------------------------------------ probe scores
    def score_pairs(self, hidden_states, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Probe scores (s_c, s_r) from the forward's own hidden states (features detached)."""
        from lit_align.probes.features import select_features

        features = select_features(hidden_states, attention_mask, self.probe.layers, self.probe.pooling).detach()
        return self.probe(features).chunk(2)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict, split: str) -> tuple[Tensor, dict]:
        """The DPO objective for one batch; returns (loss, metrics). Override to change the loss."""
        input_ids, attention_mask, completion_mask = self.concatenated(batch)
        logps, hidden = self.sequence_logps(
            self.policy, input_ids, attention_mask, completion_mask, output_hidden_states=self.probe is not None
        )
        ref_chosen, ref_rejected = self.reference_logps(batch, split)
        decision, metrics, probe_loss = self.rerank(batch, hidden, attention_mask, split)
        loss, pair_metrics = self.pair_loss(
            *logps.chunk(2), ref_chosen, ref_rejected, *completion_mask.sum(-1).chunk(2), decision=decision
        )
        metrics.update(pair_metrics)
        if probe_loss is not None:  # its gradients reach only the probe (features are detached)
            loss = loss + probe_loss
        return loss, metrics

    def rerank(
        self, batch: dict, hidden_states, attention_mask: Tensor, split: str
    ) -> tuple[Optional[PairDecision], dict, Optional[Tensor]]:
        """The re-ranker's decision on this batch (from the probe's scores of this forward's
        hidden states in training, else the one the DataModule put in the batch, if any), the
        probe's metrics and its co-training loss −log σ(s_c − s_r − m)."""
        decision: Optional[PairDecision] = batch.get(DECISION_KEY)
        metrics, probe_loss = {}, None
        if self.probe is not None:
            s_c, s_r = self.score_pairs(hidden_states, attention_mask)
            if split == "train":
                decision = self.reranker(batch, s_c.detach(), s_r.detach())
                if self.co_train_probe:
                    probe_loss, _, _ = pairwise_margin_loss(s_c, s_r, self.probe_margin)
                    metrics["probe/loss"] = probe_loss.detach()
            metrics["probe/accuracy"] = (s_c > s_r).float().mean().detach()
        if decision is not None:
            metrics.update(decision.stats)
        return decision, metrics, probe_loss

    def pair_loss(
        self,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        ref_chosen: Tensor,
        ref_rejected: Tensor,
        chosen_lengths: Tensor,
        rejected_lengths: Tensor,
        decision: Optional[PairDecision] = None,
    ) -> tuple[Tensor, dict]:
        """Mean DPO loss over the kept pairs [+ sft_weight · NLL of the chosen] and TRL's metrics,
        with the re-ranker's decision applied: flipped pairs swap chosen and rejected (log-probs,
        reference and lengths), dropped pairs are left out of the mean, and γ is the
        conservative loss's confidence."""
        confidence, keep = None, None
        if decision is not None:
            chosen_logps, rejected_logps = decision.orient(chosen_logps, rejected_logps)
            ref_chosen, ref_rejected = decision.orient(ref_chosen, ref_rejected)
            chosen_lengths, rejected_lengths = decision.orient(chosen_lengths, rejected_lengths)
            confidence, keep = decision.confidence, decision.keep
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, confidence=confidence,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        )
        loss = losses.mean() if decision is None else decision.mean(losses)
        metrics = {}
        if self.sft_weight:
            nll = sft_loss(chosen_logps, chosen_lengths, keep)
            loss = loss + self.sft_weight * nll
            metrics["nll_loss"] = nll.detach()
        metrics.update(
            {
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen_logps.detach().mean(),
                "logps/rejected": rejected_logps.detach().mean(),
            }
        )
        return loss, metrics

    @property
    def reranker(self) -> ReRanker:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "reranker", None) or ReRanker()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch, "train")
        size = batch["chosen_input_ids"].shape[0]
        self.log("loss", loss.detach(), prog_bar=True, batch_size=size)
        self.log_dict({k: float(v) if not torch.is_tensor(v) else v for k, v in metrics.items()}, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch, "val")
        size = batch["chosen_input_ids"].shape[0]
        self.log("eval_loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict({f"eval_{k}": v for k, v in metrics.items()}, batch_size=size, sync_dist=True)



__all__ = ["DPOModule"]
