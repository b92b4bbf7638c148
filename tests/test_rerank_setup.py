"""No silent no-ops in re-ranking: every option that would change nothing stops `lit-align fit`
at set-up (before any training step) with a message that says what to change.

The bad configurations are in tests/bad_inputs/rerank_*.yaml, each laid over configs/dpo_tiny.yaml."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align.cli import main
from lit_align.data.datamodule import AlignDataModule
from lit_align.data.rerank import ReRanker
from lit_align.models import PolicyConfig
from lit_align.probes import ConfidenceReRanker, HybridProbe

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_inputs"
HH = "hh_rlhf_harmless_base_test.jsonl.gz"
SOFT_IGNORED = "ignores the confidence γ (only 'conservative' reads it): set model.loss_type: conservative, or use action: flip or action: drop"

# bad config, needs a probe file, what the error must say
CONFIGS = [
    ("rerank_soft_with_sigmoid_loss.yaml", True, "model.loss_type='sigmoid' " + SOFT_IGNORED),
    ("rerank_probe_without_reranker.yaml", True,
     "model.probe_path is set but data.reranker (ReRanker()) decides nothing, so DPOModule's probe scores would "
     "change no pair: add data.reranker: {class_path: lit_align.ConfidenceReRanker, init_args: {action: soft}} "
     "or remove model.probe_path"),
    ("rerank_reranker_without_probe.yaml", False,
     "data.reranker (ConfidenceReRanker(action='flip', granularity='pair', alpha=7.5)) decides from probe scores, "
     "which DPOModule does not compute, so no pair would be re-ranked: set model.probe_path to a probe trained on "
     "this policy's hidden states (lit-align fit -c configs/probe.yaml)"),
    ("rerank_policy_key.yaml", False,
     "ConfidenceReRanker(policy='flip'): the argument is now called `action` (the policy is the trained model); "
     "write action: flip"),
    ("rerank_drop_threshold_with_soft.yaml", False,
     "ConfidenceReRanker(action='soft', drop_threshold=0.6): only action=drop uses drop_threshold; remove it or "
     "set action: drop"),
    ("rerank_co_train_without_probe.yaml", False, "model.co_train_probe needs model.probe_path (the probe file to co-train)"),
    ("rerank_probe_lr_without_co_train.yaml", False,
     "model.probe_lr, model.probe_weight_decay set, but model.co_train_probe is false, so the probe is not trained: "
     "set model.co_train_probe: true or remove model.probe_lr, model.probe_weight_decay"),
    ("rerank_label_smoothing_with_sigmoid.yaml", False,
     "model.label_smoothing=0.1 has no effect with loss_type='sigmoid': only robust and conservative read it"),
    ("rerank_reranker_in_prompts_mode.yaml", False,
     "data.reranker re-ranks preference pairs, but data.mode='prompts' has none: remove data.reranker"),
]


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory) -> str:
    return str(HybridProbe(32, [1, 2]).save(tmp_path_factory.mktemp("probe") / "probe.safetensors"))


class NoStep(L.Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("a training step ran: the set-up error came too late")


@pytest.mark.parametrize("name,needs_probe,message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_reranking_config_stops_at_setup_with_what_to_change(
    name, needs_probe, message, tiny_model_dir, shared_data, probe_file, tmp_path, capsys
):
    args = ["fit", "-c", str(ROOT / "configs/dpo_tiny.yaml"), "-c", str(BAD / name),
            f"--model.init_args.policy.name_or_path={tiny_model_dir}", f"--data.path={shared_data / HH}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--trainer.callbacks+=test_rerank_setup.NoStep"]
    if needs_probe:
        args.append(f"--model.init_args.probe_path={probe_file}")
    with pytest.raises((ValueError, SystemExit)) as err:
        main(args)
    said = str(err.value) + capsys.readouterr().err
    assert message in said, said[-2000:]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_soft_reranker_needs_the_conservative_loss(loss_type, tiny_model_dir, shared_data, probe_file, tmp_path):
    from lit_align.modules.dpo import DPOModule

    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type=loss_type, probe_path=probe_file)
    with pytest.raises(ValueError, match=f"model.loss_type='{loss_type}' " + SOFT_IGNORED.replace("(", r"\(").replace(")", r"\)")):
        fit(module, shared_data, ConfidenceReRanker("soft"), tmp_path)
    # flip and drop act through the orientation and the mask: every loss honours them
    for action in ("flip", "drop"):
        module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type=loss_type, probe_path=probe_file)
        module.check_reranker(ConfidenceReRanker(action))


def fit(module, shared_data, reranker, tmp_path, mode="preference"):
    data = AlignDataModule(str(shared_data / HH), format="hh_rlhf", mode=mode, limit=16, batch_size=4,
                           max_prompt_length=32, max_completion_length=16, on_bad_rows="skip", reranker=reranker)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[NoStep()])
    trainer.fit(module, datamodule=data)


class SelfScoring(ConfidenceReRanker):
    """Scores pairs itself, as ShadowReRanker does (by response length here)."""

    def score(self, batch):
        return (torch.tensor([-float(len(t)) for t in batch["chosen"]]), torch.tensor([-float(len(t)) for t in batch["rejected"]]))


def test_reward_model_refuses_rerankers_it_cannot_honour(tiny_model_dir, shared_data, tmp_path):
    from lit_align.modules.reward import RewardModule

    def reward_module():
        return RewardModule(PolicyConfig(name_or_path=str(tiny_model_dir)))

    with pytest.raises(ValueError, match=r"which RewardModule does not compute, so no pair would be re-ranked: a reward "
                                         r"model has no probe; use a re-ranker that scores pairs itself"):
        fit(reward_module(), shared_data, ConfidenceReRanker("flip"), tmp_path)
    with pytest.raises(ValueError, match=r"only sets \['confidence'\], which RewardModule's loss ignores: the "
                                         r"Bradley–Terry loss reads no confidence γ; use action: flip or action: drop"):
        fit(reward_module(), shared_data, SelfScoring("soft"), tmp_path)


def test_a_probe_and_a_self_scoring_reranker_conflict(tiny_model_dir, shared_data, probe_file, tmp_path):
    from lit_align.modules.dpo import DPOModule

    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type="conservative", probe_path=probe_file)
    with pytest.raises(ValueError, match=r"scores pairs itself, and DPOModule's probe \(model.probe_path\) would replace "
                                         r"those scores: remove model.probe_path or use lit_align.ConfidenceReRanker"):
        fit(module, shared_data, SelfScoring("flip"), tmp_path)


def test_a_module_that_reads_no_decision_refuses_a_reranker(tiny_model_dir, shared_data, tmp_path):
    from lit_align.modules.probe import ProbeModule

    module = ProbeModule(PolicyConfig(name_or_path=str(tiny_model_dir)))
    with pytest.raises(ValueError, match=r"decides from probe scores, which ProbeModule does not compute, so no pair "
                                         r"would be re-ranked: remove data.reranker"):
        fit(module, shared_data, ConfidenceReRanker("soft"), tmp_path)


def test_label_smoothing_replaced_by_the_rerankers_gamma_is_refused(tiny_model_dir, probe_file):
    from lit_align.modules.dpo import DPOModule

    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type="conservative", label_smoothing=0.1,
                       probe_path=probe_file)
    with pytest.raises(ValueError, match=r"model.label_smoothing=0.1 would not act in training: the re-ranker's γ "
                                         r"replaces 1 − label_smoothing .*; remove model.label_smoothing"):
        module.check_reranker(ConfidenceReRanker("soft"))
    DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), loss_type="conservative",
              label_smoothing=0.1).check_reranker(ReRanker())  # cDPO without a re-ranker: fine


def test_resuming_a_co_trained_probe_without_co_training_is_refused(tiny_model_dir):
    from lit_align.modules.dpo import DPOModule

    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)))
    module.on_load_checkpoint({"lit_align_side_optimizers": {"probe": {"state": {}, "param_groups": []}}})
    with pytest.raises(ValueError, match=r"the checkpoint holds the state of a side optimiser 'probe' that this DPOModule "
                                         r"does not have \(it has \[\]\): resume with the configuration that wrote the "
                                         r"checkpoint \(e.g. model.co_train_probe\)"):
        module.configure_model()
        module.configure_optimizers()
