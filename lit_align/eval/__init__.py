"""Safety evaluation: prompt-set presets, judges, metrics with bootstrap intervals, reports.

`lit-align evaluate` (lit_align.eval.evaluate) ties them together; `lit-align judge-accuracy`
(lit_align.eval.judge_accuracy) scores judges against human labels; see docs/evaluation.md.
"""

from lit_align.eval.drift import DriftConfig
from lit_align.eval.judges import Judge, LLMJudge, ProbeJudge, ProbeRefusalJudge, RefusalPhraseJudge, RewardJudge, Verdicts
from lit_align.eval.labelled import LabelledFile, load_labelled
from lit_align.eval.metrics import Estimate, bootstrap_ci, estimate, summarize
from lit_align.eval.phrase_tuning import TunedPhrases, tune_phrases
from lit_align.eval.prefill import PrefillConfig
from lit_align.eval.prompts import PRESETS, PromptSetConfig, load_prompt_set

__all__ = [
    "PRESETS",
    "DriftConfig",
    "Estimate",
    "Judge",
    "LLMJudge",
    "LabelledFile",
    "PrefillConfig",
    "ProbeJudge",
    "ProbeRefusalJudge",
    "PromptSetConfig",
    "RefusalPhraseJudge",
    "RewardJudge",
    "TunedPhrases",
    "Verdicts",
    "bootstrap_ci",
    "estimate",
    "load_labelled",
    "load_prompt_set",
    "summarize",
    "tune_phrases",
]
