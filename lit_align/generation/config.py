"""How completions are sampled: the options every sampler honours (or refuses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    max_new_tokens: int = 64
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    repetition_penalty: float = 1.0
    """>1 discourages repeating tokens."""
    dtype: Literal["model", "bfloat16"] = "model"
    """Weights to sample with: `model` (as they are) or `bfloat16` (a bfloat16 copy of a float32 model,
    refreshed from its weights at every call: 1.4-1.6x the tokens/s on a CPU; next-token distributions
    ~0.001 nats/token KL from float32 on SmolLM2-135M, but greedy texts differ; docs/benchmarks.md).
    Not under torch.distributed."""
