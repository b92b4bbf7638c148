"""DPOModule: off-policy preference optimisation, with optional probe re-ranking (paper A).

One training step:

    logps, hidden = policy(chosen ⊕ rejected)            # one concatenated forward
    ref_logps     = reference(chosen ⊕ rejected)         # no_grad / adapters off / disk cache
    s_c, s_r      = probe(hidden)                        # detached; only with a probe
    batch         = reranker(batch, s_c, s_r)            # γ, flips, drops (paper A2)
    loss          = mean_keep( dpo_loss(logps, ref_logps, γ) ) [+ sft_weight · NLL(chosen)]
                    [+ probe co-training loss]
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.data.rerank import ReRanker
from lit_align.losses.dpo import LOSS_TYPES, dpo_loss, sft_loss
from lit_align.models import PolicyConfig, cache_root, export_hf, load_causal_lm, load_tokenizer
from lit_align.modules.base import AlignModule, default_optimizer
from lit_align.modules.packing import packed_sequence_logps, supports_packing
from lit_align.modules.refcache import ReferenceCache

log = logging.getLogger(__name__)

REFERENCES = ("copy", "lora_base", "cached")


def swap_where(flip: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with the entries of flipped pairs exchanged."""
    return torch.where(flip, b, a), torch.where(flip, a, b)


class DPOModule(AlignModule):
    """Direct Preference Optimisation on AlignDataModule preference batches.

    Args:
        policy: The model to train (and its tokenizer); LoRA when `policy.lora` is set.
        loss_type: "sigmoid" (DPO), "ipo", "hinge", "robust" or "conservative" (cDPO with the
            re-ranker's confidence γ, or 1 − label_smoothing without one).
        beta: Strength of the implicit KL penalty (temperature of the implicit reward).
        label_smoothing: Assumed label-noise rate ε for "robust" and "conservative".
        sft_weight: Weight of an added NLL term on the chosen completions (RPO; TRL's
            `loss_type=[<loss>, "sft"]` with `loss_weights=[1, sft_weight]`); 0 turns it off.
        reference: Where reference log-probs come from: "copy" (a frozen second model),
            "lora_base" (the policy with its adapters disabled, no second copy; needs LoRA) or
            "cached" (computed once before training and stored on disk under a fingerprint of
            model + data + tokenisation, reused by later runs).
        reference_cache_dir: Where "cached" reference log-probs live (default ~/.cache/lit_align/ref_logps).
        probe_path: A probe file (lit_align.probes) scoring the policy's own hidden states; its
            scores drive the DataModule's re-ranker (paper A2).
        co_train_probe: Also train the probe every step on the dataset labels,
            −log σ(s_c − s_r − probe_margin), as its own parameter group.
        probe_lr: Learning rate of the probe's parameter group (paper: 1e-2).
        probe_weight_decay: Weight decay of the probe's parameter group (paper: 0.01).
        probe_margin: Margin m of the probe's pairwise loss.
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
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference: str = "copy",
        reference_cache_dir: Optional[str] = None,
        probe_path: Optional[str] = None,
        co_train_probe: bool = False,
        probe_lr: float = 1e-2,
        probe_weight_decay: float = 0.01,
        probe_margin: float = 1.0,
        export_dir: Optional[str] = None,
        merge_lora: bool = True,
        packing: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"model.loss_type={loss_type!r}: choose one of {LOSS_TYPES}")
        if reference not in REFERENCES:
            raise ValueError(f"model.reference={reference!r}: choose one of {REFERENCES}")
        if reference == "lora_base" and policy.lora is None:
            raise ValueError("model.reference='lora_base' needs model.policy.lora (the base is the reference)")
        if co_train_probe and probe_path is None:
            raise ValueError("model.co_train_probe needs model.probe_path")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.policy_config = policy
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.sft_weight = sft_weight
        self.reference_mode = reference
        self.reference_cache_dir = Path(reference_cache_dir) if reference_cache_dir else cache_root() / "ref_logps"
        self.probe_path, self.co_train_probe = probe_path, co_train_probe
        self.probe_lr, self.probe_weight_decay, self.probe_margin = probe_lr, probe_weight_decay, probe_margin
        self.export_dir, self.merge_lora = export_dir, merge_lora
        self.packing = packing
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.tokenizer = load_tokenizer(policy)
        self.policy = None
        self.reference = None
        self.probe = None
        self.ref_cache: Optional[ReferenceCache] = None

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = load_causal_lm(self.policy_config)
        if self.reference_mode == "copy":
            self.reference = load_causal_lm(self.policy_config, with_lora=False).eval().requires_grad_(False)
            self.reference = self.shard_model(self.reference)
        if self.probe_path is not None:
            from lit_align.probes import load_probe

            self.probe = load_probe(self.probe_path, expected_hidden_size=self.policy.config.hidden_size)
            self.probe.requires_grad_(self.co_train_probe)
        self.policy = self.shard_model(self.policy)

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]
        if self.probe is not None and self.co_train_probe:
            groups.append(
                {"params": list(self.probe.parameters()), "lr": self.probe_lr, "weight_decay": self.probe_weight_decay}
            )
        return groups

    # ------------------------------------------------------------------ log-probs
    def _logits_to_keep(self, model, completion_mask: Tensor) -> dict:
        """Compute LM-head logits only from the first completion token on (prompts are long)."""
        forward = getattr(model, "get_base_model", lambda: model)().forward
        if "logits_to_keep" not in inspect.signature(forward).parameters:
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
        logits = out.logits[:, :-1]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # log-softmax in half precision loses the small probabilities
        mask = completion_mask[:, -k + 1 :].to(logits.dtype)
        token_logps = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return (token_logps * mask).sum(-1), (out.hidden_states if output_hidden_states else None)

    @staticmethod
    def concatenated(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen rows then rejected rows: [2B, T] (the collator pads both to one length)."""
        return tuple(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "completion_mask"))

    @torch.no_grad()
    def reference_logps(self, batch: dict, split: str) -> tuple[Tensor, Tensor]:
        if self.ref_cache is not None:
            return self.ref_cache.lookup(split, batch["index"], self.device)
        input_ids, attention_mask, completion_mask = self.concatenated(batch)
        if self.reference_mode == "lora_base":
            with self.policy.disable_adapter():
                logps, _ = self.sequence_logps(self.policy, input_ids, attention_mask, completion_mask)
        else:
            logps, _ = self.sequence_logps(self.reference, input_ids, attention_mask, completion_mask)
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
        chosen_logps, rejected_logps = logps.chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch, split)
        metrics, probe_loss = {}, None
        if self.probe is not None:
            s_c, s_r = self.score_pairs(hidden, attention_mask)
            if split == "train":
                batch = self.reranker(batch, s_c.detach(), s_r.detach())
                metrics.update(batch.get("rerank_stats", {}))
                if self.co_train_probe:
                    from lit_align.losses.probe import pairwise_margin_loss

                    probe_loss, _, _ = pairwise_margin_loss(s_c, s_r, self.probe_margin)
                    metrics["probe/loss"] = probe_loss.detach()
            metrics["probe/accuracy"] = (s_c > s_r).float().mean().detach()

        chosen_lengths, rejected_lengths = completion_mask.sum(-1).chunk(2)
        flip = batch.get("pair_flip")
        if flip is not None:  # the re-ranker swapped these pairs' roles
            chosen_logps, rejected_logps = swap_where(flip, chosen_logps, rejected_logps)
            ref_chosen, ref_rejected = swap_where(flip, ref_chosen, ref_rejected)
            chosen_lengths, rejected_lengths = swap_where(flip, chosen_lengths, rejected_lengths)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            confidence=batch.get("pair_confidence"),
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        keep = batch.get("pair_keep")
        keep = torch.ones_like(losses) if keep is None else keep.to(losses.dtype)
        loss = (losses * keep).sum() / keep.sum().clamp(min=1)
        if self.sft_weight:
            nll = sft_loss(chosen_logps, chosen_lengths, keep)
            loss = loss + self.sft_weight * nll
            metrics["nll_loss"] = nll.detach()
        if probe_loss is not None:
            loss = loss + probe_loss
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

    # ------------------------------------------------------------------ export
    def export(self, out_dir: str | Path, merge_lora: Optional[bool] = None) -> Path:
        """Save the policy as a Hugging Face directory (LoRA merged, or as an adapter)."""
        merge = self.merge_lora if merge_lora is None else merge_lora
        return export_hf(self.policy, self.tokenizer, out_dir, merge_lora=merge)

    def on_train_end(self) -> None:
        if self.export_dir is not None and self.trainer.is_global_zero and getattr(self, "_device_mesh", None) is None:
            path = self.export(self.export_dir)
            log.info("exported the policy to %s", path)


__all__ = ["DPOModule"]
