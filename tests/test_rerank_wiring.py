"""The re-ranker's decision reaches the loss: DPOModule's and RewardModule's training loss in a
real Trainer step equals a reference computed by hand from that very step's log-probs (or
rewards) and probe scores.

    γ (batch) = σ(α (mean σ(s_c) − mean σ(s_r))),   γ_i (pair) = σ(α (σ(s_c,i) − σ(s_r,i))),  α = 7.5
    flip:  z_i → −z_i where γ_i < ½ (chosen and rejected swapped), confidence 1 − γ_i
    drop:  mean over the pairs with γ_i ≥ ½ only
    soft:  L_i = −γ log σ(β z_i) − (1 − γ) log σ(−β z_i),  γ clamped at ≥ ½

Nothing of the module under test is replaced: a spy records what `sequence_logps` (or
`reward`) returned and a forward hook records the probe's output, then the hand reference is
compared with the loss `training_step` returned.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_align.data.datamodule import AlignDataModule
from lit_align.models import PolicyConfig
from lit_align.modules.dpo import DPOModule
from lit_align.modules.reward import RewardModule
from lit_align.probes import ConfidenceReRanker, HybridProbe

HH = "hh_rlhf_harmless_base_test.jsonl.gz"
ALPHA, BETA = 7.5, 0.3


def make_probe_file(path) -> str:
    """A random probe with opinions: on the tiny model it disagrees with some labels, not all."""
    torch.manual_seed(0)
    probe = HybridProbe(32, [1, 2])
    with torch.no_grad():
        probe.weight.normal_(std=0.5)
        probe.vote.weight.normal_()
    return str(probe.save(path))


def datamodule(shared_data, reranker, batch_size=8, limit=40):
    return AlignDataModule(
        str(shared_data / HH), format="hh_rlhf", limit=limit, batch_size=batch_size, max_prompt_length=48,
        max_completion_length=24, on_bad_rows="skip", reranker=reranker, val_fraction=0.0, shuffle=False,
    )


def trainer(tmp_path, max_steps, callbacks, **kw):
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, **kw,
    )


def spy(obj, name: str, record: list, when=lambda *a, **k: True):
    """Wrap `obj.name` so that every call still runs the real method and its result is recorded."""
    real = getattr(obj, name)

    def recorded(*args, **kwargs):
        out = real(*args, **kwargs)
        if when(*args, **kwargs):
            record.append(out)
        return out

    setattr(obj, name, recorded)


class DPOStepRecorder(L.Callback):
    """Per training step: the policy's and reference's log-probs of that forward, the probe's scores
    of that forward, and the loss `training_step` returned."""

    def __init__(self):
        self.steps: list[dict] = []
        self._logps, self._scores = [], []

    def on_train_start(self, trainer, module):
        spy(module, "sequence_logps", self._logps)
        module.probe.register_forward_hook(lambda _m, _i, out: self._scores.append(out.detach().clone()))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._logps.clear(), self._scores.clear()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # the step's forwards in order: the policy (with hidden states), then the reference copy
        (policy, _), (reference, _) = self._logps
        (scores,) = self._scores
        self.steps.append({
            "policy": policy.detach().chunk(2), "reference": reference.detach().chunk(2),
            "scores": scores.chunk(2), "loss": outputs["loss"].detach(),
        })


def hand_decision(s_c, s_r, action, granularity, threshold=0.5):
    """γ, flip, keep as SPEC A2 defines them, written out here."""
    p_c, p_r = torch.sigmoid(s_c), torch.sigmoid(s_r)
    if granularity == "batch":
        gamma = torch.sigmoid(ALPHA * ((p_c.mean() - 0.5) - (p_r.mean() - 0.5))).expand(len(s_c))
    else:
        gamma = torch.sigmoid(ALPHA * (p_c - p_r))
    flip = gamma < 0.5 if action == "flip" else torch.zeros_like(gamma, dtype=torch.bool)
    keep = gamma >= threshold if action == "drop" else torch.ones_like(gamma, dtype=torch.bool)
    confidence = torch.where(flip, 1 - gamma, gamma).clamp(min=0.5)
    return confidence, flip, keep


def hand_dpo_loss(step, action, granularity, loss_type):
    (pi_c, pi_r), (ref_c, ref_r), (s_c, s_r) = step["policy"], step["reference"], step["scores"]
    gamma, flip, keep = hand_decision(s_c, s_r, action, granularity)
    z = (pi_c - ref_c) - (pi_r - ref_r)
    z = torch.where(flip, -z, z)  # a flipped pair is the swapped pair: chosen ↔ rejected negates z
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(BETA * z)
    else:
        losses = -gamma * F.logsigmoid(BETA * z) - (1 - gamma) * F.logsigmoid(-BETA * z)
    return losses[keep].mean(), gamma, flip, keep


CASES = [  # (action, granularity, loss_type)
    ("soft", "batch", "conservative"),  # the paper's setting
    ("soft", "pair", "conservative"),
    ("flip", "pair", "sigmoid"),
    ("flip", "pair", "conservative"),
    ("drop", "pair", "sigmoid"),
    ("drop", "pair", "conservative"),
]


@pytest.mark.parametrize("action,granularity,loss_type", CASES, ids=["-".join(c) for c in CASES])
def test_dpo_loss_follows_the_decision_on_that_forwards_scores(
    tiny_model_dir, shared_data, tmp_path, action, granularity, loss_type
):
    module = DPOModule(
        PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type=loss_type, beta=BETA, reference="copy",
        probe_path=make_probe_file(tmp_path / "probe.safetensors"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),  # large: step 2's log-probs differ from step 1's
    )
    recorder = DPOStepRecorder()
    trainer(tmp_path, 3, [recorder]).fit(module, datamodule=datamodule(shared_data, ConfidenceReRanker(action, granularity)))

    assert len(recorder.steps) == 3
    decided = {"flip": [], "keep": [], "gamma": []}
    for step in recorder.steps:
        expected, gamma, flip, keep = hand_dpo_loss(step, action, granularity, loss_type)
        torch.testing.assert_close(step["loss"], expected, rtol=1e-5, atol=1e-6)
        decided["flip"].append(flip), decided["keep"].append(keep), decided["gamma"].append(gamma)
    flips, keeps, gammas = (torch.cat(v) for v in decided.values())
    # the fixture exercises the decision: some pairs changed and some not, and γ is neither ½ nor 1
    if action == "flip":
        assert flips.any() and not flips.all()
    if action == "drop":
        assert keeps.any() and not keeps.all()
    if action == "soft":
        assert ((gammas > 0.5) & (gammas < 0.99)).any()


class RewardStepRecorder(L.Callback):
    def __init__(self):
        self.steps, self._rewards = [], []

    def on_train_start(self, trainer, module):
        spy(module, "reward", self._rewards)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._rewards.clear()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        (rewards,) = self._rewards
        self.steps.append({"rewards": rewards.detach().float().chunk(2), "batch": batch, "loss": outputs["loss"].detach()})


class LengthReRanker(ConfidenceReRanker):
    """Scores pairs itself (as ShadowReRanker does): the shorter response is the better one."""

    def score(self, batch):
        def lengths(texts):
            return -torch.tensor([len(t) for t in texts], dtype=torch.float) / 40

        return lengths(batch["chosen"]), lengths(batch["rejected"])


@pytest.mark.parametrize("action", ["flip", "drop"])
def test_reward_loss_follows_the_decision(tiny_model_dir, shared_data, tmp_path, action):
    margin = 0.5
    module = RewardModule(
        PolicyConfig(name_or_path=str(tiny_model_dir)), margin=margin,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    recorder = RewardStepRecorder()
    trainer(tmp_path, 3, [recorder]).fit(module, datamodule=datamodule(shared_data, LengthReRanker(action, "pair")))

    changed, unchanged = 0, 0
    for step in recorder.steps:
        r_c, r_r = step["rewards"]
        batch = step["batch"]
        s_c, s_r = LengthReRanker().score(batch)
        _, flip, keep = hand_decision(s_c, s_r, action, "pair")
        d = torch.where(flip, r_r - r_c, r_c - r_r)  # a flipped pair: the swapped pair's reward difference
        expected = -F.logsigmoid(d - margin)[keep].mean()
        torch.testing.assert_close(step["loss"], expected, rtol=1e-5, atol=1e-6)
        mask = flip if action == "flip" else ~keep
        changed, unchanged = changed + int(mask.sum()), unchanged + int((~mask).sum())
    assert changed and unchanged
