"""Experiments: `lit-align ablate` (arms trained under one budget, evaluated, compared), its prepare steps and its cost meter.

Names load lazily: a fit that only needs `CostMeter` does not import the report's plotting."""

from __future__ import annotations

from lit_align.lazy import lazy_exports

_EXPORTS = {
    "AblationInputs": "lit_align.experiments.ablate",
    "ArmConfig": "lit_align.experiments.ablate",
    "ablate": "lit_align.experiments.ablate",
    "PrepareStep": "lit_align.experiments.prepare",
    "filter_prompts": "lit_align.experiments.prepare",
    "CostMeter": "lit_align.experiments.costs",
    "ArmMetric": "lit_align.experiments.summary",
    "verdict": "lit_align.experiments.summary",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
