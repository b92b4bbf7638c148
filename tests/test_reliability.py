"""NonFiniteGuard, atomic checkpoints and safe loading, on the tiny model with real Trainer runs."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lit_align.models  # noqa: F401  (allow-lists PolicyConfig for weights_only loads)
from lit_align.data.datamodule import AlignDataModule
from lit_align.data.formats import load_source
from lit_align.models import PolicyConfig, load_causal_lm
from lit_align.modules.dpo import DPOModule
from lit_align.reliability import AtomicCheckpointIO, NonFiniteError, NonFiniteGuard, reliability_callbacks

SCRIPTS = Path(__file__).resolve().parent / "reliability_scripts"
HH = "hh_rlhf_harmless_base_test.jsonl.gz"


class PoisonedDPO(DPOModule):
    """DPO whose loss (or only its gradient) turns NaN at chosen steps; records those batches' rows."""

    def __init__(self, *args, poison_steps=(), poison="loss", **kwargs):
        super().__init__(*args, **kwargs)
        self.poison_steps, self.poison = set(poison_steps), poison
        self.poisoned_rows: dict[int, list[int]] = {}

    def compute_loss(self, batch, split):
        loss, metrics = super().compute_loss(batch, split)
        if split == "train" and self.global_step in self.poison_steps:
            self.poisoned_rows[self.global_step] = batch["index"].tolist()
            if self.poison == "loss":
                loss = loss * float("nan")
            else:  # finite value, NaN gradient: d/dx sqrt(|0·x|) = inf·0
                first = next(p for p in self.policy.parameters() if p.requires_grad)
                loss = loss + (first.sum() * 0).abs().sqrt()
        return loss, metrics


class WeightsAround(Callback):
    """Policy weights before and after every training batch."""

    def __init__(self):
        self.before, self.after = {}, {}

    def _snapshot(self, module):
        return [p.detach().clone() for p in module.policy.parameters()]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = self._snapshot(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._snapshot(module)


def datamodule(shared_data):
    return AlignDataModule(str(shared_data / HH), format="hh_rlhf", limit=32, batch_size=4, max_prompt_length=32,
                           max_completion_length=16, on_bad_rows="skip")


def fit(module, shared_data, tmp_path, max_steps, callbacks):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, callbacks=callbacks, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=datamodule(shared_data))
    return trainer


def every_step_checkpoints(tmp_path):
    return ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1, save_last=True)


def lr(p):
    return torch.optim.AdamW(p, lr=1e-3)


def test_nan_loss_stops_naming_step_batch_and_rows_and_keeps_good_checkpoints(tiny_model_dir, shared_data, tmp_path):
    module = PoisonedDPO(PolicyConfig(name_or_path=str(tiny_model_dir)), poison_steps={2}, optimizer=lr)
    with pytest.raises(NonFiniteError) as err:
        fit(module, shared_data, tmp_path, 5, [every_step_checkpoints(tmp_path), *reliability_callbacks()])
    message = str(err.value)
    rows = module.poisoned_rows[2]
    assert "step 2" in message and "batch 2" in message and f"rows index {rows}" in message
    assert "loss = nan" in message and "last good checkpoint is" in message and "last.ckpt" in message
    saved = sorted(p.name for p in (tmp_path / "ckpts").glob("*.ckpt"))
    assert saved == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # the NaN update was never applied: memory still equals the last checkpoint
    for name, p in module.named_parameters():
        if name in last["state_dict"]:
            assert torch.equal(p.detach(), last["state_dict"][name]), name


def test_nan_gradient_with_finite_loss_is_caught(tiny_model_dir, shared_data, tmp_path):
    module = PoisonedDPO(PolicyConfig(name_or_path=str(tiny_model_dir)), poison_steps={1}, poison="grad", optimizer=lr)
    with pytest.raises(NonFiniteError, match=r"step 1 .*non-finite gradients in 1 parameters \(e\.g\. policy\.model\.embed_tokens\.weight\)"):
        fit(module, shared_data, tmp_path, 3, reliability_callbacks())


def test_skip_mode_skips_counts_logs_and_has_a_limit(tiny_model_dir, shared_data, tmp_path):
    policy = PolicyConfig(name_or_path=str(tiny_model_dir))
    module = PoisonedDPO(policy, poison_steps={1, 3}, optimizer=lr)
    guard, weights = NonFiniteGuard("skip", max_skipped_batches=2), WeightsAround()
    trainer = fit(module, shared_data, tmp_path, 5, [guard, weights, every_step_checkpoints(tmp_path)])
    assert trainer.global_step == 5 and guard.skipped == 2
    assert [s["step"] for s in guard.skipped_at] == [1, 3]
    assert trainer.callback_metrics["nonfinite/skipped_batches"] == 2
    for step in range(5):
        same = all(torch.equal(a, b) for a, b in zip(weights.before[step], weights.after[step]))
        assert same == (step in (1, 3)), f"step {step}: skipped steps leave the weights alone, others move them"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # the count is checkpointed, so the limit holds across a resume
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)["callbacks"]["NonFiniteGuard"]["skipped"] == 2

    module = PoisonedDPO(policy, poison_steps={1, 3}, optimizer=lr)
    with pytest.raises(NonFiniteError, match="step 3 .*more than max_skipped_batches=1"):
        fit(module, shared_data, tmp_path / "limit", 5, [NonFiniteGuard("skip", max_skipped_batches=1)])


def test_a_guard_configured_by_the_user_replaces_the_default_one(tiny_model_dir, shared_data, tmp_path):
    from lit_align.lightning_cli import run_lightning_cli

    module = PoisonedDPO(PolicyConfig(name_or_path=str(tiny_model_dir)), poison_steps={1}, optimizer=lr)
    user_guard = NonFiniteGuard("skip", max_skipped_batches=1)
    trainer = fit(module, shared_data, tmp_path, 3, [*reliability_callbacks(), user_guard])
    assert trainer.global_step == 3 and user_guard.skipped == 1
    # the same from a YAML config: trainer.callbacks takes a NonFiniteGuard like any callback
    config = tmp_path / "skip.yaml"
    config.write_text(
        "trainer:\n  max_steps: 0\n  callbacks:\n    - class_path: lit_align.reliability.NonFiniteGuard\n"
        "      init_args: {on_nonfinite: skip, max_skipped_batches: 3}\n"
    )
    cli = run_lightning_cli([
        "fit", "-c", str(Path(__file__).resolve().parents[1] / "configs/dpo_tiny.yaml"), "-c", str(config),
        f"--model.init_args.policy.name_or_path={tiny_model_dir}", f"--data.path={shared_data / HH}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
    ])
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert sorted((g.default, g.enabled, g.on_nonfinite) for g in guards) == [(False, True, "skip"), (True, False, "stop")]


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tiny_model_dir, shared_data, tmp_path):
    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), optimizer=lr)
    trainer = fit(module, shared_data, tmp_path, 1, reliability_callbacks())
    good = tmp_path / "good.ckpt"
    trainer.save_checkpoint(good)
    with torch.no_grad():
        module.policy.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="policy.lm_head.weight"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists() and good.exists()


def run_script(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tiny_model_dir, shared_data, tmp_path):
    script = SCRIPTS / "kill_during_save.py"
    common = ["--model", tiny_model_dir, "--data", shared_data / HH, "--kill-at-save", 3]
    proc = run_script(script, *common, "--out", tmp_path / "atomic")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    [partial] = list((tmp_path / "atomic").glob(".last.ckpt.*.tmp"))  # the write that was cut short
    last = torch.load(tmp_path / "atomic" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and last["state_dict"]
    # the next save clears what the killed process left behind
    AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "atomic" / "last.ckpt")
    assert not partial.exists()
    assert torch.load(tmp_path / "atomic" / "last.ckpt", weights_only=True) == {"step": 3}

    # control: writing the checkpoint in place loses the previous one to the same kill
    proc = run_script(script, *common, "--out", tmp_path / "plain", "--plain-torch-save")
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(Exception):
        torch.load(tmp_path / "plain" / "last.ckpt", weights_only=True)


# ---------------------------------------------------------------------------- safe loading
class CreatesFile:
    """Unpickling this creates a file: stands in for any code a malicious pickle would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tiny_model_dir, shared_data, tmp_path):
    marker = tmp_path / "code_ran"
    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), optimizer=lr)
    trainer = fit(module, shared_data, tmp_path, 1, reliability_callbacks())
    ckpt = tmp_path / "evil.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    state["payload"] = CreatesFile(marker)
    torch.save(state, ckpt)
    resumed = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), optimizer=lr)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, callbacks=reliability_callbacks(),
                        limit_val_batches=0, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.fit(resumed, datamodule=datamodule(shared_data), ckpt_path=ckpt)
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # control: a plain pickle load does run it
    assert marker.exists()


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    assert PolicyConfig().trust_remote_code is False
    marker = tmp_path / "code_ran"
    model_dir = tmp_path / "remote_code_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "evil_lm", "architectures": ["EvilLM"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"},
    }))
    (model_dir / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(PolicyConfig(name_or_path=str(model_dir)))
    assert not marker.exists()


def test_reading_a_dataset_never_runs_code_from_it(tmp_path):
    marker = tmp_path / "code_ran"
    code = f"open({str(marker)!r}, 'w').close()\n"
    script_dir = tmp_path / "scripted_dataset"  # an old-style `datasets` loading script
    script_dir.mkdir()
    (script_dir / "scripted_dataset.py").write_text(code)
    (tmp_path / "rows.py").write_text(code)
    with open(tmp_path / "rows.pkl", "wb") as f:
        pickle.dump([CreatesFile(marker)], f)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": code, "chosen": "__import__('os')", "rejected": "b"}) + "\n")
    for path in (script_dir, tmp_path / "rows.py", tmp_path / "rows.pkl"):
        with pytest.raises(Exception):
            load_source(str(path))
    rows = load_source(str(tmp_path / "rows.jsonl"))
    assert rows[0]["prompt"] == code  # text stays text
    assert not marker.exists()
