"""GRPO `dapo` under DDP on 2 CPU processes (gloo) against 1 process on the same data.

TRL normalises `dapo` by the active tokens of the whole generation batch on all processes;
dividing by each process's own tokens weighs the processes' tokens unequally when they hold
different numbers of them. Both runs see the same completions (tests/dist_scripts/fixed_rollouts.py
replaces sampling only) and the two processes' prompts have completions of different lengths,
so only the global count gives the 1-process loss and gradients. Plain SGD, no clipping: the
weights after each step are w − lr·g, so equal weights mean equal gradients.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
from fixed_rollouts import completion_lengths  # noqa: E402
from harness import ROOT, fit  # noqa: E402

pytestmark = pytest.mark.distributed

G = 4
PROMPTS = [f"Tell me about topic number {i}." for i in range(4)]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo_ddp")
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 4, "limit_val_batches": 0, "val_check_interval": None,
                    "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp)},  # where LightningCLI saves config.yaml (not the repository)
        "model": {"class_path": "fixed_rollouts.FixedRolloutGRPO", "init_args": {
            "policy": {"name_or_path": str(tiny_model_dir)},
            "reward_funcs": ["fixed_rollouts:length_reward"], "sampling": {"num_generations": G, "max_new_tokens": 20},
            "loss": {"loss_type": "dapo", "beta": 0.04}, "reference": "copy",
            "updates": {"num_iterations": 2, "micro_batch_size": 2, "max_grad_norm": None},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
        }},
        "data": {"path": str(data), "format": "generic", "mode": "prompts", "val_fraction": 0.0, "shuffle": False,
                 "max_prompt_length": 32},
    }
    (tmp / "common.yaml").write_text(yaml.safe_dump(common))
    out = {}
    for name, devices, extra in (("one", 1, []), ("two", 2, [str(ROOT / "configs" / "strategy" / "ddp.yaml")])):
        out[name] = fit(tmp, name, [tmp / "common.yaml", *extra],
                        {"trainer": {"devices": devices, "default_root_dir": str(tmp / name)},
                         "model": {"init_args": {"export_dir": str(tmp / f"{name}_policy")}},
                         "data": {"batch_size": 2 // devices}},
                        model_attrs=["policy"], generate=False)
        out[f"{name}_policy"] = tmp / f"{name}_policy"
    return out


def test_the_processes_hold_different_token_counts():
    """The case the fix is about: rank 0 gets prompts 0, 2 and rank 1 prompts 1, 3."""
    for a, b in ((PROMPTS[0], PROMPTS[1]), (PROMPTS[2], PROMPTS[3])):
        assert sum(completion_lengths(a, G)) != sum(completion_lengths(b, G))


def test_dapo_loss_and_weights_match_one_process(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    one, two = runs["one"], runs["two"]
    assert two["world_size"] == 2 and one["global_step"] == two["global_step"] == 4  # 2 batches x 2 iterations
    assert len(one["losses"]) == len(two["losses"]) == 2
    for a, b in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, abs=1e-6, rel=1e-5)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    weights = {k: AutoModelForCausalLM.from_pretrained(runs[f"{k}_policy"]).state_dict() for k in ("one", "two")}
    moved = max(float((w - start[name]).abs().max()) for name, w in weights["one"].items())
    assert moved > 1e-3  # the steps really changed the weights
    for name, w in weights["one"].items():
        torch.testing.assert_close(weights["two"][name], w, atol=2e-6, rtol=1e-5, msg=name)
