"""lit_align: PyTorch Lightning modules for efficient LLM safety alignment.

The public API is importable from here (`from lit_align import DPOModule`); names load lazily
so that `import lit_align` stays cheap for the command line.
"""

from __future__ import annotations

from lit_align.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models and data
    "PolicyConfig": "lit_align.models",
    "LoraArgs": "lit_align.models",
    "load_causal_lm": "lit_align.models",
    "load_tokenizer": "lit_align.models",
    "export_hf": "lit_align.models",
    "ReRanker": "lit_align.data.rerank",
    "PairDecision": "lit_align.data.rerank",
    "AlignDataModule": "lit_align.data.datamodule",
    "load_rows": "lit_align.data.formats",
    "BadRowError": "lit_align.data.formats",
    "ConfigError": "lit_align.checks",
    "DPOModule": "lit_align.modules.dpo",
    "OnlineDPOModule": "lit_align.modules.online_dpo",
    "AlignModule": "lit_align.modules.base",
    "PolicyModule": "lit_align.modules.policy",
    "WarmupCosineLR": "lit_align.modules.base",
    "dpo_loss": "lit_align.losses.dpo",
    "HFGenerator": "lit_align.generation",
    "SamplingConfig": "lit_align.generation",
    # -- registry: one line per public name --
    "NonFiniteGuard": "lit_align.reliability",
    "AtomicCheckpointIO": "lit_align.reliability",
    "reliability_callbacks": "lit_align.reliability",
    "FSDP2Strategy": "lit_align.sharding",
    "ShardingConfig": "lit_align.sharding",
    "shard_model": "lit_align.sharding",
    "gathered_parameters": "lit_align.sharding",
    "export_checkpoint": "lit_align.export",
    "RewardModule": "lit_align.modules.reward",
    "bradley_terry_loss": "lit_align.losses.reward",
    "BradleyTerryLoss": "lit_align.losses.reward",
    "build_cod": "lit_align.srmir.cod",
    "train_shadow": "lit_align.srmir.shadow",
    "load_manifest": "lit_align.srmir.shadow",
    "heldout_accuracy": "lit_align.srmir.accuracy",
    "ShadowRewardEnsemble": "lit_align.srmir.ensemble",
    "ShadowReRanker": "lit_align.srmir.ensemble",
    "PromptCategoryClassifier": "lit_align.srmir.classifier",
    "PromptSource": "lit_align.srmir.categories",
    "GRPOModule": "lit_align.modules.grpo",
    "GRPOSamplingConfig": "lit_align.modules.grpo_config",
    "GRPOLossConfig": "lit_align.modules.grpo_config",
    "GRPOUpdateConfig": "lit_align.modules.grpo_config",
    "CompletionsLogger": "lit_align.callbacks",
    "grpo_loss": "lit_align.losses.grpo",
    "GRPOLoss": "lit_align.losses.grpo",
    "group_advantages": "lit_align.losses.grpo",
    "compute_advantages": "lit_align.losses.grpo",
    "CategorizedReward": "lit_align.rewards",
    "SequenceClassifierReward": "lit_align.rewards",
    "ProbeReward": "lit_align.rewards",
    "refusal_reward": "lit_align.rewards",
    "route_by_category": "lit_align.rewards",
    "Generator": "lit_align.generation",
    "LeanGenerator": "lit_align.generation",
    "evaluate": "lit_align.eval.evaluate",
    "PromptSetConfig": "lit_align.eval.prompts",
    "load_prompt_set": "lit_align.eval.prompts",
    "PrefillConfig": "lit_align.eval.prefill",
    "DriftConfig": "lit_align.eval.drift",
    "RefusalPhraseJudge": "lit_align.eval.judges",
    "ProbeJudge": "lit_align.eval.judges",
    "RewardJudge": "lit_align.eval.judges",
    "LLMJudge": "lit_align.eval.judges",
    "ProbeRefusalJudge": "lit_align.eval.judges",
    "judge_accuracy": "lit_align.eval.judge_accuracy",
    "tune_phrases": "lit_align.eval.phrase_tuning",
    "LabelledFile": "lit_align.eval.labelled",
    "load_labelled": "lit_align.eval.labelled",
    "HybridProbe": "lit_align.probes.probe",
    "LogisticProbe": "lit_align.probes.probe",
    "MeanDiffProbe": "lit_align.probes.probe",
    "load_probe": "lit_align.probes.probe",
    "ConfidenceReRanker": "lit_align.probes.rerank",
    "select_features": "lit_align.probes.features",
    "pairwise_margin_loss": "lit_align.losses.probe",
    "ProbeModule": "lit_align.modules.probe",
    "ProbeScorer": "lit_align.probes.candidates",
    "ablate": "lit_align.experiments.ablate",
    "AblationInputs": "lit_align.experiments.ablate",
    "ArmConfig": "lit_align.experiments.ablate",
    "PrepareStep": "lit_align.experiments.prepare",
    "filter_prompts": "lit_align.experiments.prepare",
    "CostMeter": "lit_align.experiments.costs",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
