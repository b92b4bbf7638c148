"""`lit-align evaluate`'s generation cache is keyed by the weights' content
(`lit_align.modules.refcache.model_fingerprint`), not by file modification times."""

from __future__ import annotations

import json
import os

from lit_align.eval.evaluate import evaluate
from lit_align.eval.prompts import PromptSetConfig
from lit_align.generation import SamplingConfig
from lit_align.testing import make_tiny_model


def run(model_dir, prompts, out):
    evaluate([str(model_dir)], [PromptSetConfig(preset="custom", path=str(prompts), name="p")], str(out), names=["m"],
             sampling=SamplingConfig(max_new_tokens=6, temperature=0.0), batch_size=2, device="cpu",
             num_resamples=10, progress=False)  # fmt: skip
    (cache,) = (out / "generations").glob("m__p*.json")
    return cache, json.loads(cache.read_text())


def test_cache_follows_weight_content_not_mtime(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["How do I bake bread?", "Tell me a joke", "What is 2+2?"]))
    model = make_tiny_model(tmp_path / "model", seed=0)
    out = tmp_path / "run"
    cache, first = run(model, prompts, out)
    written = cache.stat().st_mtime_ns

    # the same weights saved again (new modification times): the cache is read, not rewritten
    make_tiny_model(model, seed=0)
    cache, again = run(model, prompts, out)
    assert again == first and cache.stat().st_mtime_ns == written

    # other weights of the same shapes re-saved into the folder, its files' times put back: generated again
    times = {f: f.stat().st_mtime_ns for f in model.iterdir()}
    make_tiny_model(model, seed=1)
    for f, t in times.items():
        os.utime(f, ns=(t, t))
    cache, other = run(model, prompts, out)
    assert other["fingerprint"] != first["fingerprint"]
    _, fresh = run(model, prompts, tmp_path / "fresh")  # what these weights generate without any cache
    assert other["responses"] == fresh["responses"] != first["responses"]
