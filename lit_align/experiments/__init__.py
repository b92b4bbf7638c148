"""Experiments: `lit-align ablate` (arms trained under one budget, evaluated, compared) and its cost meter."""

from lit_align.experiments.ablate import AblationInputs, ArmConfig, ablate
from lit_align.experiments.costs import CostMeter
from lit_align.experiments.summary import ArmMetric, verdict

__all__ = ["AblationInputs", "ArmConfig", "ArmMetric", "CostMeter", "ablate", "verdict"]
