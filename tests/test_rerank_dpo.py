"""Probe re-ranking inside DPO: one policy forward per batch, scores from that forward's
hidden states, and a co-trained probe whose state resumes from the checkpoint."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from lit_align.data.datamodule import AlignDataModule
from lit_align.models import PolicyConfig, load_causal_lm
from lit_align.modules.dpo import DPOModule
from lit_align.probes import ConfidenceReRanker, HybridProbe, load_probe, select_features

HH = "hh_rlhf_harmless_base_test.jsonl.gz"


class Recorder(L.Callback):
    """Counts policy/reference forwards per training batch and records the re-ranker's inputs."""

    def __init__(self):
        self.policy_forwards, self.reference_forwards, self.decisions = 0, 0, []
        self.probe_at_start, self.totals_at_start, self.handles = None, None, []

    def on_train_start(self, trainer, module):
        self.probe_at_start = {k: v.clone() for k, v in module.probe.state_dict().items()}
        self.totals_at_start = dict(trainer.datamodule.reranker.totals)
        self.handles = [
            module.policy.register_forward_hook(lambda *_: setattr(self, "policy_forwards", self.policy_forwards + 1)),
            module.reference.register_forward_hook(lambda *_: setattr(self, "reference_forwards", self.reference_forwards + 1)),
        ]
        reranker, decide = trainer.datamodule.reranker, trainer.datamodule.reranker.decide

        def recording_decide(batch, s_c, s_r):
            self.decisions.append({"index": batch["index"].clone(), "s_c": s_c.clone(), "s_r": s_r.clone()})
            out = decide(batch, s_c, s_r)
            self.decisions[-1].update({"confidence": out.confidence, "flip": out.flip, "keep": out.keep})
            return out

        reranker.decide = recording_decide

    def on_train_end(self, trainer, module):
        for h in self.handles:
            h.remove()


def make_probe_file(path) -> str:
    torch.manual_seed(0)
    probe = HybridProbe(32, [1, 2])
    with torch.no_grad():
        probe.weight.normal_(std=0.5)
        probe.vote.weight.normal_()
    return str(probe.save(path))


def setup(tiny_model_dir, shared_data, probe_path, action="flip"):
    module = DPOModule(
        PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type="conservative", beta=0.1, reference="copy",
        probe_path=probe_path, co_train_probe=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    data = AlignDataModule(
        str(shared_data / HH), format="hh_rlhf", limit=40, batch_size=4, max_prompt_length=64, max_completion_length=32,
        on_bad_rows="skip", reranker=ConfidenceReRanker(action, "pair"), val_fraction=0.0,
    )
    return module, data


def trainer(tmp_path, max_steps, callbacks, **kw):
    args = dict(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    return L.Trainer(**{**args, **kw})


def test_dpo_rerank_one_forward_scores_from_own_hidden_states_and_resume(tiny_model_dir, shared_data, tmp_path):
    probe_path = make_probe_file(tmp_path / "probe.safetensors")
    module, data = setup(tiny_model_dir, shared_data, probe_path)
    recorder = Recorder()
    t = trainer(tmp_path, 3, [recorder])
    t.fit(module, datamodule=data)

    # exactly one policy forward (and one reference forward) per training batch
    assert len(recorder.decisions) == 3
    assert recorder.policy_forwards == 3 and recorder.reference_forwards == 3
    assert "rerank/flipped_frac" in t.callback_metrics and "probe/loss" in t.callback_metrics

    # the first batch's scores are the probe on the initial policy's own hidden states
    first = recorder.decisions[0]
    fresh = load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir))).eval()
    probe = load_probe(probe_path)
    for side, recorded in (("chosen", first["s_c"]), ("rejected", first["s_r"])):
        for i, index in enumerate(first["index"].tolist()):
            example = data.train_set[index]
            ids = torch.tensor([example["prompt_ids"] + example[f"{side}_ids"]])
            with torch.no_grad():
                hidden = fresh(input_ids=ids, output_hidden_states=True).hidden_states
                expected = probe(select_features(hidden, torch.ones_like(ids), probe.layers))
            torch.testing.assert_close(recorded[i : i + 1], expected, atol=1e-4, rtol=1e-4)
    # ... and the decision is the flip action applied to them (some pairs flipped, some not)
    flips = torch.cat([d["flip"] for d in recorder.decisions])
    assert flips.any() and not flips.all()
    for d in recorder.decisions:
        gamma = torch.sigmoid(7.5 * (torch.sigmoid(d["s_c"]) - torch.sigmoid(d["s_r"])))
        assert torch.equal(d["flip"], gamma < 0.5)
        torch.testing.assert_close(d["confidence"], torch.where(gamma < 0.5, 1 - gamma, gamma).clamp(min=0.5))

    # co-training moved the probe; its state and the re-ranker's counts resume from the checkpoint
    trained = {k: v.clone() for k, v in module.probe.state_dict().items()}
    assert not torch.allclose(trained["weight"], probe.weight)
    totals = dict(data.reranker.totals)
    assert totals["pairs"] == 12 and totals["batches"] == 3
    ckpt = tmp_path / "step3.ckpt"
    t.save_checkpoint(ckpt)

    module2, data2 = setup(tiny_model_dir, shared_data, probe_path)
    resumed = Recorder()
    t2 = trainer(tmp_path, 4, [resumed])
    t2.fit(module2, datamodule=data2, ckpt_path=str(ckpt))
    for k, v in trained.items():
        torch.testing.assert_close(resumed.probe_at_start[k], v)
    assert resumed.totals_at_start == totals
    assert len(resumed.decisions) == 1 and data2.reranker.totals["pairs"] == 16


def test_dpo_rerank_config_runs_through_the_cli(tiny_model_dir, shared_data, tmp_path):
    import csv
    from pathlib import Path

    from lit_align.cli import main

    probe_path = make_probe_file(tmp_path / "probe.safetensors")
    main([
        "fit", "-c", str(Path(__file__).resolve().parents[1] / "configs/dpo_rerank.yaml"),
        f"--model.init_args.policy.name_or_path={tiny_model_dir}",
        f"--model.init_args.probe_path={probe_path}",
        "--model.init_args.optimizer.init_args.lr=1e-3",
        f"--data.path={shared_data / HH}", "--data.limit=24", "--data.batch_size=4",
        "--data.max_prompt_length=64", "--data.max_completion_length=32",
        "--data.reranker.init_args.action=drop", "--data.reranker.init_args.granularity=pair",
        "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
    ])
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    train_rows = [r for r in rows if r.get("loss")]
    assert len(train_rows) == 2
    for name in ("rerank/confidence_mean", "rerank/dropped_frac", "rerank/probe_accuracy", "probe/loss", "eval_probe/accuracy"):
        assert any(r.get(name) for r in rows), name
    assert all(0.5 <= float(r["rerank/confidence_mean"]) <= 1.0 for r in train_rows)


# ---------------------------------------------------------------------------- the probe's own optimiser
class ProbeStepRecorder(L.Callback):
    """The probe before training, its input features in every training forward, and at each
    optimiser step: the policy's gradient norm and lr (after clipping and scheduling) and the
    probe optimiser's gradient norm and lr."""

    def __init__(self):
        self.initial, self.features, self.policy, self.probe = None, [], [], []

    def on_train_start(self, trainer, module):
        self.initial = copy.deepcopy(module.probe)
        module.probe.register_forward_hook(lambda _m, inputs, _o: self.features.append(inputs[0].detach().clone()))

        def seen(record):
            def hook(optimizer, *_):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                record.append({"norm": float(torch.nn.utils.get_total_norm(grads)), "lr": optimizer.param_groups[0]["lr"]})
            return hook

        # after the step: Lightning clips inside the policy's step call (its closure runs the backward)
        trainer.optimizers[0].register_step_post_hook(seen(self.policy))
        if module.probe_optimizer is not None:
            module.probe_optimizer.register_step_post_hook(seen(self.probe))


def co_trained(tiny_model_dir, probe_path, **kw):
    return DPOModule(
        PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type="conservative", beta=0.1, reference="copy",
        probe_path=probe_path, co_train_probe=True, probe_lr=1e-2, probe_weight_decay=0.01,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **kw,
    )


def test_probe_update_is_its_own_adam_step_unscheduled_unclipped(tiny_model_dir, shared_data, tmp_path):
    """Two accumulated batches, policy gradients clipped to 1e-4 and its lr warmed up from 0.1x:
    the probe's update is exactly torch.optim.Adam(lr 1e-2, weight decay 0.01) on the mean of the
    two batches' probe losses −log σ(s_c − s_r − 1), from the same features."""
    from lit_align.losses.probe import pairwise_margin_loss
    from lit_align.modules.base import WarmupCosineLR

    probe_path = make_probe_file(tmp_path / "probe.safetensors")
    module = co_trained(tiny_model_dir, probe_path, lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=10))
    data = setup(tiny_model_dir, shared_data, probe_path, action="soft")[1]
    data.reranker = ConfidenceReRanker("soft", "batch")
    recorder = ProbeStepRecorder()
    trainer(tmp_path, 1, [recorder], accumulate_grad_batches=2, gradient_clip_val=1e-4).fit(module, datamodule=data)

    assert len(recorder.features) == 2 and len(recorder.policy) == 1
    hand = recorder.initial
    adam = torch.optim.Adam(hand.parameters(), lr=1e-2, weight_decay=0.01)
    loss = sum(pairwise_margin_loss(*hand(f).chunk(2), 1.0)[0] / 2 for f in recorder.features)
    loss.backward()
    probe_grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in hand.parameters()]))
    adam.step()
    for (name, mine), theirs in zip(module.probe.named_parameters(), hand.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=name)
    # the policy was clipped and scheduled; the probe was neither
    assert recorder.policy[0]["norm"] <= 1e-4 * 1.001 and recorder.policy[0]["lr"] == pytest.approx(1e-4)
    assert len(recorder.probe) == 1  # one probe step per policy step
    assert recorder.probe[0]["norm"] == pytest.approx(probe_grad_norm, rel=1e-5) and probe_grad_norm > 1e-2
    assert recorder.probe[0]["lr"] == 1e-2


def test_resume_restores_the_probe_optimizer(tiny_model_dir, shared_data, tmp_path):
    """3 steps in one run == resuming that run's step-2 checkpoint for step 3: the probe's Adam
    moments and step count come back from the checkpoint (a fresh Adam takes another third step)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    probe_path = make_probe_file(tmp_path / "probe.safetensors")

    def run(callbacks, ckpt=None):
        module, data = co_trained(tiny_model_dir, probe_path), setup(tiny_model_dir, shared_data, probe_path)[1]
        trainer(tmp_path, 3, callbacks, enable_checkpointing=True).fit(module, datamodule=data, ckpt_path=ckpt)
        return module

    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    straight = run([every_step])
    ckpt = tmp_path / "ckpt" / "step=2.ckpt"
    saved = torch.load(ckpt, weights_only=True)["lit_align_side_optimizers"]["probe"]
    assert all(int(s["step"]) == 2 for s in saved["state"].values())
    assert saved["param_groups"][0]["lr"] == 1e-2 and saved["param_groups"][0]["weight_decay"] == 0.01
    resumed = run([ModelCheckpoint(dirpath=tmp_path / "ckpt2")], str(ckpt))
    assert all(int(s["step"]) == 3 for s in resumed.probe_optimizer.state_dict()["state"].values())
    for (name, a), b in zip(straight.probe.named_parameters(), resumed.probe.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


class NaNAtStep(DPOModule):
    """Fault injection: the loss turns NaN at one step (the whole backward, probe included, goes NaN)."""

    def __init__(self, *args, nan_step=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step = nan_step

    def compute_loss(self, batch, split):
        loss, metrics = super().compute_loss(batch, split)
        if split == "train" and self.trainer.global_step == self.nan_step:
            loss = loss * float("nan")
        return loss, metrics


def test_a_policy_step_dropped_by_the_guard_drops_the_probe_step(tiny_model_dir, shared_data, tmp_path):
    from lit_align.reliability import NonFiniteGuard

    probe_path = make_probe_file(tmp_path / "probe.safetensors")
    module = NaNAtStep(
        PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type="conservative", beta=0.1, reference="copy",
        probe_path=probe_path, co_train_probe=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    data = setup(tiny_model_dir, shared_data, probe_path)[1]
    guard = NonFiniteGuard("skip", max_skipped_batches=1)
    trainer(tmp_path, 3, [guard]).fit(module, datamodule=data)
    assert guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in module.probe.parameters())  # the NaN gradients were never applied
    assert all(int(s["step"]) == 2 for s in module.probe_optimizer.state_dict()["state"].values())
