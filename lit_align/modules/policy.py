"""PolicyModule: what every module that trains a causal-LM policy against a frozen reference shares.

    __init__         init_policy(...): the policy's config, tokenizer, reference mode, export settings
    configure_model  policy (+ LoRA) and, with reference="copy", a frozen reference copy; both through
                     `shard_model` (FSDP2); then `configure_extras()` (a probe, reward models, ...)
    reference        `with self.reference_model() as ref:` the copy, or the policy with its adapters
                     disabled ("lora_base": no second copy)
    end of fit       the policy exported to `export_dir` (AlignModule.on_train_end)

DPOModule (and OnlineDPOModule) and GRPOModule keep only their algorithm.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from lit_align.checks import ConfigError
from lit_align.models import PolicyConfig, export_hf, load_causal_lm, load_tokenizer
from lit_align.modules.base import AlignModule


class PolicyModule(AlignModule):
    """Base class of modules that train `self.policy` (see the module docstring)."""

    def init_policy(
        self, policy: PolicyConfig, reference: str, export_dir: Optional[str], merge_lora: bool, optimizer, lr_scheduler
    ) -> None:
        """Keep the settings and load the tokenizer (the DataModule tokenises with it); models load
        in `configure_model`."""
        if reference == "lora_base" and policy.lora is None:
            raise ConfigError("model.reference='lora_base' needs model.policy.lora (the base is the reference)")
        self.policy_config, self.reference_mode = policy, reference
        self.export_dir, self.merge_lora = export_dir, merge_lora
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.tokenizer = load_tokenizer(policy)
        self.policy = None
        self.reference = None

    def needs_reference_copy(self) -> bool:
        """Whether to load a frozen second copy as the reference (override: GRPO with β = 0 needs none)."""
        return self.reference_mode == "copy"

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = load_causal_lm(self.policy_config)
        if self.needs_reference_copy():
            reference = load_causal_lm(self.policy_config, with_lora=False).eval().requires_grad_(False)
            self.reference = self.shard_model(reference)
        self.policy = self.shard_model(self.policy)
        self.configure_extras()

    def configure_extras(self) -> None:
        """Load what the module needs besides the policy and its reference (called once, after them)."""

    @contextlib.contextmanager
    def reference_model(self) -> Iterator:
        """The frozen reference: the copy, or the policy with its LoRA adapters disabled."""
        if self.reference_mode == "lora_base":
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.reference

    def parameter_groups(self) -> list[dict]:
        """The policy's trainable parameters (side-trained modules have their own optimisers)."""
        return [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]

    def export(self, out_dir: str | Path, merge_lora: Optional[bool] = None) -> Path:
        """Save the policy as a Hugging Face directory (LoRA merged, or as an adapter)."""
        merge = self.merge_lora if merge_lora is None else merge_lora
        return export_hf(self.policy, self.tokenizer, out_dir, merge_lora=merge)


__all__ = ["PolicyModule"]
