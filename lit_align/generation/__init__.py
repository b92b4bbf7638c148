"""Sampling completions from a causal LM: the options (`config`), the `Generator` interface and the
transformers back end (`generator`), the lean decode loop (`lean`: the loop and `LeanGenerator`;
`logits`: picking the next token; `decoder`: prefill, KV cache, attention) and the generation-only
linear layers (`linear`).

The names below load lazily (as `lit_align`'s do), so that `from lit_align.generation import
SamplingConfig` does not import transformers. `lit_align.generation.SamplingConfig` is the path
saved configs and checkpoints name.
"""

from __future__ import annotations

from lit_align.lazy import lazy_exports

_MODULE = {  # submodule -> the public names it defines
    "config": ["SamplingConfig"],
    "generator": ["Completions", "completions_from_ids", "cast_copy", "refresh_copy", "Generator", "HFGenerator"],
    "lean": ["LeanGenerator", "sample_ids"],
    "linear": ["ChunkedHead", "chunkable_head", "Int8Linear", "int8_for_generation"],
}
_EXPORTS = {name: f"{__name__}.{module}" for module, names in _MODULE.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
