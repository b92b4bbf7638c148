"""Representation-based reward (paper A): probes on hidden states and confidence re-ranking."""

from lit_align.probes.confidence import batch_confidence, pair_confidence
from lit_align.probes.features import cached_features, extract_features, select_features
from lit_align.probes.probe import HybridProbe, LogisticProbe, MeanDiffProbe, Probe, build_probe, load_probe
from lit_align.probes.rerank import ConfidenceReRanker

__all__ = [
    "ConfidenceReRanker",
    "HybridProbe",
    "LogisticProbe",
    "MeanDiffProbe",
    "Probe",
    "batch_confidence",
    "build_probe",
    "cached_features",
    "extract_features",
    "load_probe",
    "pair_confidence",
    "select_features",
]
