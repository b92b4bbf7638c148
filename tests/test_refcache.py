"""The disk-cached reference (`model.reference: cached`): keyed by the weights' content, and a
real training run with it equals one with a frozen copy. The 2-process DDP run is in
tests/test_distributed_parity.py."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align.data.datamodule import AlignDataModule
from lit_align.models import PolicyConfig
from lit_align.modules.dpo import DPOModule
from lit_align.modules.refcache import model_fingerprint
from lit_align.testing import make_tiny_model

HH = "hh_rlhf_harmless_base_test.jsonl.gz"


class Losses(L.Callback):
    """Every training step's loss."""

    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def fit(model_dir: Path, reference: str, cache: Path, shared_data, tmp_path, max_steps: int = 3) -> tuple[DPOModule, list]:
    L.seed_everything(0)
    module = DPOModule(PolicyConfig(name_or_path=str(model_dir)), reference=reference, reference_cache_dir=str(cache),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = AlignDataModule(str(shared_data / HH), format="hh_rlhf", limit=24, batch_size=4, max_prompt_length=48,
                           max_completion_length=24, on_bad_rows="skip")
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        val_check_interval=max_steps, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[losses])
    trainer.fit(module, datamodule=data)
    return module, losses.values


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return make_tiny_model(tmp_path / "model", seed=0)


def test_fingerprint_follows_the_weights_content(model_dir, tmp_path):
    policy = PolicyConfig(name_or_path=str(model_dir))
    first = model_fingerprint(policy)
    sizes = {p.name: p.stat().st_size for p in model_dir.iterdir()}
    make_tiny_model(model_dir, seed=1)  # other weights, same shapes, same file sizes
    assert {p.name: p.stat().st_size for p in model_dir.iterdir()} == sizes
    assert model_fingerprint(policy) != first
    make_tiny_model(model_dir, seed=0)
    assert model_fingerprint(policy) == first  # deterministic: the same weights, the same key

    # one small tensor changed (a norm's 32 values) is seen too: every tensor is sampled
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 0.5
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(policy) != first
    # and how the weights are loaded is part of it
    assert model_fingerprint(PolicyConfig(name_or_path=str(model_dir), dtype="bfloat16")) != model_fingerprint(policy)


def test_fingerprint_of_a_hub_id_reads_its_cached_snapshot(model_dir, tmp_path):
    """A hub id is fingerprinted through its snapshot in the Hugging Face cache (offline)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    hub = PolicyConfig(name_or_path="org/tiny", extra={"cache_dir": str(cache)})
    local = PolicyConfig(name_or_path=str(repo / "snapshots" / "abc123"), extra={"cache_dir": str(cache)})
    assert model_fingerprint(hub) == model_fingerprint(local)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor in the Hugging Face cache"):
        model_fingerprint(PolicyConfig(name_or_path="org/absent", extra={"cache_dir": str(cache)}))


def test_overwritten_weights_rebuild_the_cache(model_dir, shared_data, tmp_path):
    """Train with the cached reference, re-save other weights of the same shapes into the same
    folder, train again: the second run computes its own reference log-probs. A policy equal to
    its reference has z = 0, so the first step's loss is log 2 exactly when the cache is fresh
    (a stale one, from the first weights, gives another value)."""
    cache = tmp_path / "ref_cache"
    _, losses = fit(model_dir, "cached", cache, shared_data, tmp_path)
    first_files = sorted(cache.glob("*.pt"))
    assert len(first_files) == 2  # train and val
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and abs(losses[-1] - math.log(2)) > 1e-4  # it trained

    make_tiny_model(model_dir, seed=1)
    module, losses = fit(model_dir, "cached", cache, shared_data, tmp_path)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 4 and set(first_files) < set(files)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    # the tables in use are the new files', not the first weights' log-probs
    old = [torch.load(f, weights_only=True) for f in first_files]
    for table in module.ref_cache.tables.values():
        assert all(table.shape != o.shape or (table - o).abs().max() > 1e-2 for o in old)


def test_cached_reference_trains_like_the_frozen_copy(model_dir, shared_data, tmp_path):
    """A few real optimiser steps: the same losses and the same final weights."""
    copy, copy_losses = fit(model_dir, "copy", tmp_path / "unused", shared_data, tmp_path)
    cached, cached_losses = fit(model_dir, "cached", tmp_path / "ref_cache", shared_data, tmp_path)
    assert len(copy_losses) == len(cached_losses) == 3
    assert abs(copy_losses[-1] - math.log(2)) > 1e-4  # the policy moved away from its reference
    for a, b in zip(copy_losses, cached_losses):
        assert b == pytest.approx(a, abs=1e-6)
    for name, p in copy.policy.named_parameters():
        torch.testing.assert_close(cached.policy.get_parameter(name), p, atol=1e-6, rtol=1e-5, msg=name)
    assert cached.reference is None  # no second model in memory
