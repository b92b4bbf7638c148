"""The generation cache of `lit-align evaluate`: responses generated batch by batch and stored under
`out_dir/generations/<model>__<set><suffix>.json`, keyed by the evaluated weights' content, the
prompts and every generation setting, so a re-run with the same settings re-judges without
regenerating and an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from lit_align.generation import Generator, SamplingConfig
from lit_align.models import PolicyConfig

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the completions' token ids are stored too (prefill prefixes, drift answers)


def weights_fingerprint(spec: str, dtype: str = "float32") -> str:
    """The content fingerprint of the evaluated weights, as `lit_align.modules.refcache` takes it:
    a model directory, alias or downloaded hub id through `model_fingerprint` (every file, a
    strided sample of every safetensors tensor), a `.ckpt` file through `file_sample`. Weights
    re-saved into the same place get a new fingerprint; a re-save of the same weights keeps it.
    (A `.ckpt` holding only a LoRA adapter is keyed by the adapter, not by its base model.)
    A hub id not downloaded yet is keyed by its name."""
    from lit_align.modules.refcache import file_sample, model_fingerprint

    path = Path(spec)
    if path.is_file():
        digest = hashlib.sha256(f"{path.name}:{path.stat().st_size}:{dtype}".encode())
        file_sample(path, digest)
        return digest.hexdigest()[:16]
    try:
        return model_fingerprint(PolicyConfig(name_or_path=spec, dtype=dtype))
    except FileNotFoundError:
        return f"{spec}:{dtype}"


def _fingerprint(
    spec: str, rows: list[dict], sampling: SamplingConfig, seed: int, batch_size: int, sampler: str, extra=None,
    weights: str = "",
) -> str:  # fmt: skip
    h = hashlib.sha256(json.dumps([spec, weights, dataclasses.asdict(sampling), seed, batch_size, sampler, CACHE_FORMAT, extra]).encode())
    h.update(json.dumps([r["prompt"] for r in rows]).encode())
    return h.hexdigest()[:24]


def _generate(
    generator: Generator, rows, sampling, batch_size, seed, progress, desc, cache: Path, key: str,
    encode: Optional[Callable] = None,
) -> dict:
    """{"responses", "length_tokens", "truncated", "token_ids"} for `rows`, resumed from `cache`
    when its key matches.

    Same batching and seeding as `Generator.generate` (batch i uses seed + i); the cache is
    rewritten after every batch, so an interrupted run continues where it stopped. Lengths and
    token ids cover the generated tokens up to and including the first EOS. `encode(generator,
    rows)` gives a batch's prompt ids (default: the chat-rendered prompts)."""
    out = {"fingerprint": key, "responses": [], "length_tokens": [], "truncated": [], "token_ids": []}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("fingerprint") == key:
            out = stored
    starts = range(0, len(rows), batch_size)
    done_batches = len(out["responses"]) // batch_size
    if done_batches:
        log.info("%s: reusing %d cached responses from %s", desc, len(out["responses"]), cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    todo = starts[done_batches:] if len(out["responses"]) < len(rows) else []
    bar = tqdm(todo, desc=desc, disable=not progress, initial=done_batches, total=len(starts))
    for i, start in enumerate(bar, start=done_batches):
        chunk = rows[start : start + batch_size]
        ids, mask = encode(generator, chunk) if encode else generator.encode_prompts([r["prompt"] for r in chunk])
        batch = generator.generate_ids(ids, mask, sampling, 1, None if seed is None else seed + i)
        out["responses"] += batch.texts
        out["length_tokens"] += batch.completion_mask.sum(1).tolist()
        out["truncated"] += batch.truncated.tolist()
        out["token_ids"] += [c[: int(m.sum())].tolist() for c, m in zip(batch.completion_ids, batch.completion_mask)]
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(cache)
    return out


@dataclass
class Generations:
    """Cached generations of one run: `out_dir/generations/<model>__<set><suffix>.json`."""

    out: Path
    sampling: SamplingConfig
    batch_size: int
    seed: int
    progress: bool
    dtype: str = "float32"
    weights: dict = dataclasses.field(default_factory=dict)
    """spec -> `weights_fingerprint`, taken once per run."""

    def __call__(self, generator, spec, label, set_name, rows, suffix="", extra=None, encode=None, sampling=None):
        """(generation, cache path) of `rows` (see `_generate`)."""
        sampling = sampling or self.sampling
        if spec not in self.weights:
            self.weights[spec] = weights_fingerprint(spec, self.dtype)
        key = _fingerprint(spec, rows, sampling, self.seed, self.batch_size, type(generator).__name__, extra, self.weights[spec])
        cache = self.out / "generations" / f"{_safe(label)}__{_safe(set_name)}{suffix}.json"
        desc = f"{label} / {set_name}{suffix}"
        return _generate(generator, rows, sampling, self.batch_size, self.seed, self.progress, desc, cache, key, encode), cache

    def greedy(self, generator, spec, label, set_name, rows):
        """Greedy answers of the run's length: the main generation itself (same cache) when that is greedy."""
        greedy = SamplingConfig(max_new_tokens=self.sampling.max_new_tokens, temperature=0.0)
        suffix = "" if greedy == self.sampling else "__greedy"
        return self(generator, spec, label, set_name, rows, suffix=suffix, sampling=greedy)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
