"""GRPOModule end to end on the tiny model: the CLI run learns, checkpoints resume exactly,
micro-batching keeps gradients, configs parse."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ["insult", "privacy_property"]


def a_fraction(prompts, completions, **columns):
    """Verifiable toy reward: the share of characters that are 'a'."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def insult_only(prompts, completions, category, **columns):
    """Applies to insult prompts only (None elsewhere)."""
    return [float(len(c)) if cat == "insult" else None for c, cat in zip(completions, category)]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"Tell me about topic number {i}.", "category": CATEGORIES[i % 2]} for i in range(16)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _override(tmp_path: Path, tiny: Path, prompts: Path, steps: int, **model) -> Path:
    cfg = {
        "trainer": {
            "accelerator": "cpu", "max_steps": steps, "default_root_dir": str(tmp_path), "limit_val_batches": 0,
            "val_check_interval": None, "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [{"class_path": "lit_align.CompletionsLogger", "init_args": {"every_n_steps": 4}}],
        },
        "model": {"init_args": {
            "policy": {"name_or_path": str(tiny), "lora": None},
            "reward_funcs": ["test_grpo_module:a_fraction"], "loss": {"beta": 0.0},
            "sampling": {"num_generations": 8, "max_new_tokens": 16}, "export_dir": None,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-2}}, **model,
        }},
        "data": {"path": str(prompts), "format": "generic", "limit": None, "batch_size": 4, "val_fraction": 0.0,
                 "max_prompt_length": 64},
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run_dir: Path) -> pd.DataFrame:
    (csv_path,) = run_dir.glob("lightning_logs/version_*/metrics.csv")
    return pd.read_csv(csv_path)


def test_cli_run_raises_a_verifiable_reward(tiny_model_dir, prompts_file, tmp_path):
    from lit_align.cli import main

    override = _override(tmp_path, tiny_model_dir, prompts_file, steps=12)
    main(["fit", "-c", str(ROOT / "configs" / "grpo_function.yaml"), "-c", str(override)])
    metrics = _metrics(tmp_path)
    for name in ["reward", "reward_std", "rewards/a_fraction/mean", "rewards/a_fraction/std", "frac_reward_zero_std",
                 "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
                 "completions/clipped_ratio", "entropy", "loss"]:
        assert name in metrics.columns, name
    reward = metrics.dropna(subset=["reward"]).sort_values("step")["reward"].to_numpy()
    assert len(reward) == 12
    first, last = reward[:3].mean(), reward[-3:].mean()
    print(f"mean reward, first 3 steps {first:.3f} -> last 3 steps {last:.3f}")
    assert last > first + 0.05, (first, last)
    (table,) = tmp_path.glob("lightning_logs/version_*/completions.csv")
    check_completions_table(pd.read_csv(table, keep_default_na=False), steps=[0, 4, 8], rows_per_step=8, group=8)


def check_completions_table(rows: pd.DataFrame, steps: list[int], rows_per_step: int, group: int) -> None:
    """CompletionsLogger's rows: the logged steps, the batch's first completions (prompt-major, so
    the first `group` rows share a prompt), each with its own reward and group-relative advantage."""
    assert list(rows.columns) == ["step", "prompt", "completion", "a_fraction", "advantage"]
    assert sorted(set(rows["step"])) == steps
    for _, logged in rows.groupby("step"):
        assert len(logged) == rows_per_step
        expected = a_fraction(None, logged["completion"].tolist())
        assert logged["a_fraction"].tolist() == pytest.approx(expected, abs=1e-6)  # row i's reward is completion i's
        first = logged.iloc[:group]
        assert first["prompt"].nunique() == 1 and first["prompt"].str.startswith("Tell me about topic").all()
        reward = first["a_fraction"].to_numpy()
        advantage = (reward - reward.mean()) / (reward.std(ddof=1) + 1e-4)  # scale_rewards: group
        assert first["advantage"].tolist() == pytest.approx(advantage.tolist(), abs=1e-4)


def _fit(tiny, prompts, root: Path, steps: int, ckpt_path=None, shuffle=True, validate=False, batch_size=4,
         logger=False, lora=None, loss=None, updates=None, callbacks=None, **model_args):
    import lightning as L

    from lit_align import AlignDataModule, GRPOLossConfig, GRPOModule, GRPOSamplingConfig, GRPOUpdateConfig, PolicyConfig

    L.seed_everything(0)
    module = GRPOModule(
        PolicyConfig(name_or_path=str(tiny), lora=lora), reward_funcs=[a_fraction, insult_only],
        sampling=GRPOSamplingConfig(num_generations=4, max_new_tokens=8), loss=GRPOLossConfig(**(loss or {})),
        updates=GRPOUpdateConfig(**(updates or {})), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **model_args,
    )
    data = AlignDataModule(str(prompts), mode="prompts", batch_size=batch_size, val_fraction=0.0, shuffle=shuffle,
                           val_path=str(prompts) if validate else None)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, default_root_dir=root, logger=logger, enable_progress_bar=False,
        limit_val_batches=1 if validate else 0, num_sanity_val_steps=0, enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Checkpoint after one generation batch (4 optimiser steps), resume, and land on the same
    weights as a run that never stopped. One batch per epoch and no shuffling, so the data
    order is the same whatever the loader does on resume: this checks the module's state
    (rollout boundaries, optimiser, per-step sampling seeds), not mid-epoch loader resume."""
    prompts = tmp_path / "four.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "category": CATEGORIES[i % 2]}) for i in range(4)))
    opts = dict(loss=dict(beta=0.04), updates=dict(num_iterations=2, steps_per_generation=2, micro_batch_size=4),
                reference="copy", shuffle=False)
    straight, _ = _fit(tiny_model_dir, prompts, tmp_path / "a", steps=8, **opts)
    _, first = _fit(tiny_model_dir, prompts, tmp_path / "b", steps=4, **opts)
    assert first.global_step == 4  # 4 optimiser steps = 1 generation batch × 2 iterations × 2 slices
    (ckpt,) = (tmp_path / "b").glob("checkpoints/*.ckpt")
    checkpoint = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])  # frozen copy not saved
    from lit_align import GRPOModule  # the option groups are hyper-parameters: they come back from the file

    loaded = GRPOModule.load_from_checkpoint(ckpt, reward_funcs=[a_fraction, insult_only])  # weights_only load
    assert (loaded.loss.beta, loaded.updates.num_iterations, loaded.sampling.max_new_tokens) == (0.04, 2, 8)
    resumed, second = _fit(tiny_model_dir, prompts, tmp_path / "c", steps=8, ckpt_path=ckpt, **opts)
    assert second.global_step == 8
    for (name, a), (_, b) in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_lora_base_reference_run_logs_kl(tiny_model_dir, prompts_file, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_align import CompletionsLogger
    from lit_align.models import LoraArgs

    module, trainer = _fit(
        tiny_model_dir, prompts_file, tmp_path, steps=2, lora=LoraArgs(r=4, alpha=8), loss=dict(beta=0.1),
        updates=dict(num_iterations=2), validate=True, logger=TensorBoardLogger(tmp_path),
        callbacks=[CompletionsLogger(every_n_steps=1, num_completions=3)],
    )
    (events,) = {p.parent for p in tmp_path.glob("lightning_logs/version_0/events.*")}
    accumulator = EventAccumulator(str(events)).Reload()
    (text,) = accumulator.Tensors("completions/text_summary")[:1]
    table = text.tensor_proto.string_val[0].decode()
    assert "| step | prompt | completion | a_fraction | insult_only | advantage |" in table
    assert len(pd.read_csv(events / "completions.csv")) == 3
    assert module.reference is None and module.reference_mode == "lora_base"
    logged = dict(trainer.logged_metrics)
    assert logged["kl"] >= 0
    # insult_only applies to half the prompts; its mean is over those only
    assert logged["rewards/insult_only/mean"] > 0
    (validated,) = trainer.validate(module, trainer.datamodule)
    for name in ["eval_reward", "eval_reward_std", "eval_rewards/a_fraction/mean", "eval_completions/mean_length"]:
        assert name in validated, name


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_give_the_same_gradient(tiny_model_dir, loss_type):
    from lit_align import GRPOLossConfig, GRPOModule, GRPOSamplingConfig, PolicyConfig
    from lit_align.generation import HFGenerator

    module = GRPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), reward_funcs=[a_fraction],
                        sampling=GRPOSamplingConfig(num_generations=3, max_new_tokens=6),
                        loss=GRPOLossConfig(loss_type=loss_type, beta=0.05))
    module.configure_model()
    ids, mask = HFGenerator(module.policy, module.tokenizer).encode_prompts(["hello", "tell me a joke"])
    rollout_from = module.sample({"prompt_input_ids": ids, "prompt_attention_mask": mask}, seed=3)
    from lit_align.modules.grpo import Rollout

    g = torch.Generator().manual_seed(0)
    rollout = Rollout(rollout_from.prompt_ids, rollout_from.prompt_mask, rollout_from.completion_ids,
                      rollout_from.completion_mask, torch.randn(6, generator=g))
    rollout.ref_logps = module.frozen_logps(rollout, "ref")
    rollout.old_logps = rollout.ref_logps + 0.3 * torch.randn(rollout.ref_logps.shape, generator=g)
    grads = []
    for micro in (None, 4):
        module.updates.micro_batch_size = micro
        module.policy.zero_grad()
        stats = module.accumulate_gradients(rollout, num_items=float(rollout.completion_mask.sum()))
        grads.append([p.grad.clone() for p in module.policy.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert stats["kl"] >= 0


@pytest.mark.parametrize("name", ["grpo_function", "grpo_linear", "grpo_categorized", "demo/grpo", "paper_b/grpo",
                                  "paper_b/tiny_grpo"])
def test_configs_parse(name, capsys):
    from lit_align.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("GRPOModule")
    assert printed["data"]["mode"] == "prompts"
    model = printed["model"]["init_args"]
    assert (model["loss"]["beta"], model["loss"]["use_bias_correction_kl"]) == (0.04, False)  # SRMIR's KL (DeepSeekMath k3)
    loggers = [c for c in printed["trainer"]["callbacks"] if c["class_path"] == "lit_align.CompletionsLogger"]
    assert len(loggers) == 1  # sampled completions are logged, as before the callback existed


def test_bad_options_fail_clearly(tiny_model_dir):
    from lit_align import GRPOModule, GRPOSamplingConfig, PolicyConfig

    policy = PolicyConfig(name_or_path=str(tiny_model_dir))
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1"):
        GRPOModule(policy, reward_funcs=[a_fraction], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="lora_base' needs model.policy.lora"):
        GRPOModule(policy, reward_funcs=[a_fraction], reference="lora_base")
    with pytest.raises(ValueError, match="could not be imported"):
        GRPOModule(policy, reward_funcs=["no_such_module:reward"])
    with pytest.raises(ValueError, match="model.sampling.num_generations=1"):
        GRPOModule(policy, reward_funcs=[a_fraction], sampling=GRPOSamplingConfig(num_generations=1))


def test_completions_logger_refuses_what_would_log_nothing():
    import lightning as L

    from lit_align import CompletionsLogger, ConfigError

    with pytest.raises(ConfigError, match="CompletionsLogger.every_n_steps=0 is out of range"):
        CompletionsLogger(every_n_steps=0)
    with pytest.raises(ConfigError, match="LightningModule samples none: remove it from trainer.callbacks"):
        CompletionsLogger().setup(L.Trainer(logger=False), L.LightningModule(), "fit")


def closed_form_gradient(policy, initial: dict, rollout, advantages):
    """A copy of `policy` at the `initial` weights whose .grad is that of the first step's dapo loss
    −Σ_i Â_i log π(y_i|x_i) / Σ_i |y_i|, one forward per completion (no batching, no shared prompt)."""
    import copy

    start = copy.deepcopy(policy)
    with torch.no_grad():
        for name, p in start.named_parameters():
            p.copy_(initial[name])
    lengths, objective = rollout.completion_mask.sum(1).float(), 0.0
    for i in range(len(lengths)):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        completion = rollout.completion_ids[i][rollout.completion_mask[i].bool()]
        logits = start(torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(1, completion[:, None]).sum()
        objective = objective - advantages[i] * logp / lengths.sum()
    objective.backward()
    return start


@pytest.mark.slow
def test_smollm2_lora_grpo_steps(prompts_file, tmp_path):
    """One optimiser step on the real SmolLM2-135M-Instruct with LoRA and KL to its base
    (2 prompts × 2 completions × 8 tokens: the CPU here is shared), checked against the closed
    form of the first step. LoRA's B starts at 0, so the policy is its reference (KL = 0, and the
    k3 term's gradient is 0 there) and the sampling policy (ratio = 1): the dapo loss is
    −Σ_i Â_i·|y_i| / Σ_i |y_i| and its gradient −Σ_i Â_i ∇log π(y_i|x_i) / Σ_i |y_i|, with
    Â_i = (r_i − mean_g r) / (std_g r + 1e-4) (unbiased std over the prompt's 2 completions).
    Plain SGD with lr 1 and no clipping: the step moves the weights by exactly −gradient, which is
    recomputed here with one forward per completion, independent of the module's batched code."""
    import lightning as L

    from lit_align import AlignDataModule, GRPOLossConfig, GRPOModule, GRPOSamplingConfig, GRPOUpdateConfig, PolicyConfig
    from lit_align.models import LoraArgs

    class Recorded(GRPOModule):
        def make_rollout(self, batch, seed):
            self.initial = {n: p.detach().clone() for n, p in self.policy.named_parameters()}
            self.recorded = super().make_rollout(batch, seed)
            return self.recorded

    L.seed_everything(0)
    module = Recorded(PolicyConfig(name_or_path="smollm2-135m-instruct", lora=LoraArgs(r=8, alpha=16)),
                      reward_funcs=[a_fraction], sampling=GRPOSamplingConfig(num_generations=2, max_new_tokens=8),
                      loss=GRPOLossConfig(beta=0.04), updates=GRPOUpdateConfig(max_grad_norm=None),
                      optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    data = AlignDataModule(str(prompts_file), mode="prompts", batch_size=2, val_fraction=0.0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, data)
    logged = dict(trainer.logged_metrics)
    assert trainer.global_step == 1
    rollout, _, (texts, rewards_per_func, _) = module.recorded
    rewards = torch.tensor(a_fraction(None, texts))
    torch.testing.assert_close(rewards_per_func[:, 0], rewards)
    grouped = rewards.view(2, 2)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    assert advantages.abs().min() > 0.5  # the seeded samples differ in reward within each group
    lengths = rollout.completion_mask.sum(1).float()
    assert float(logged["loss"]) == pytest.approx(float(-(advantages * lengths).sum() / lengths.sum()), abs=1e-6)
    assert float(logged["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(logged["reward"]) == pytest.approx(float(rewards.mean()), abs=1e-6)
    assert float(logged["completions/mean_length"]) == pytest.approx(float(lengths.mean()))

    start = closed_form_gradient(module.policy, module.initial, rollout, advantages)
    trained = dict(module.policy.named_parameters())
    lora_b = [n for n, p in start.named_parameters() if p.requires_grad and "lora_B" in n]
    assert len(lora_b) > 0
    for name, p in start.named_parameters():
        if not p.requires_grad:
            continue
        step = module.initial[name] - trained[name].detach()  # = lr · gradient
        if "lora_A" in name:  # no gradient reaches A while B = 0
            assert step.abs().max() == 0, name
        else:
            torch.testing.assert_close(step, p.grad, rtol=1e-3, atol=1e-7, msg=name)
    assert max(float(trained[n].abs().max()) for n in lora_b) > 1e-4  # the step did train


def test_function_config_on_real_hh_rlhf_prompts(tiny_model_dir, shared_data, tmp_path):
    """configs/grpo_function.yaml's own data section (HH-RLHF red-team prompts, prompts mode)
    with the tiny model and refusal_reward, for one step."""
    from lit_align.cli import main

    cfg = yaml.safe_load(_override(tmp_path, tiny_model_dir, Path("unused"), steps=1).read_text())
    cfg["model"]["init_args"]["reward_funcs"] = ["lit_align.rewards:refusal_reward"]
    cfg["data"] = {"path": str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"), "limit": 16}
    override = tmp_path / "real.yaml"
    override.write_text(yaml.safe_dump(cfg))
    main(["fit", "-c", str(ROOT / "configs" / "grpo_function.yaml"), "-c", str(override)])
    metrics = _metrics(tmp_path)
    assert metrics["rewards/refusal_reward/mean"].notna().sum() == 1
    table = pd.read_csv(next(tmp_path.glob("lightning_logs/version_*/completions.csv")))
    assert table["prompt"].str.len().gt(0).all()  # real HH-RLHF human turns


def test_probe_reward_is_bound_to_the_policy(tiny_model_dir, tmp_path):
    from lit_align import GRPOModule, GRPOSamplingConfig, PolicyConfig, ProbeReward
    from lit_align.generation import HFGenerator
    from lit_align.probes import HybridProbe

    torch.manual_seed(0)
    probe = HybridProbe(32, layers=[1, 2])
    with torch.no_grad():
        for param in probe.parameters():
            param.normal_()
    path = probe.save(tmp_path / "probe.safetensors")
    module = GRPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), reward_funcs=[ProbeReward(str(path))],
                        sampling=GRPOSamplingConfig(num_generations=2, max_new_tokens=4))
    module.configure_model()
    assert module.reward_funcs[0].model is module.policy
    ids, mask = HFGenerator(module.policy, module.tokenizer).encode_prompts(["hi", "hello"])
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt": ["hi", "hello"], "category": [None, None]}
    completions = module.sample(batch, seed=0)
    rewards = module.score(batch, completions.texts)
    assert rewards.shape == (4, 1) and torch.isfinite(rewards).all() and rewards.std() > 0

