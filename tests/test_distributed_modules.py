"""FSDP2 on 2 CPU processes (gloo) for the other modules: the reward model and GRPO.

Subprocess runs of `lit-align fit` with a timeout (see tests/dist_scripts/harness.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
from harness import FSDP2, ROOT, SCRIPTS, fit, run  # noqa: E402

HH = "hh_rlhf_harmless_base_test.jsonl.gz"

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reward_runs(shared_data, tiny_model_dir, tmp_path_factory):
    """A LoRA reward model (peft also trains the score head) on 4 pairs: one global batch per step."""
    tmp = tmp_path_factory.mktemp("reward_fsdp2")
    common = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "limit_val_batches": 0, "val_check_interval": 1.0,
                    "logger": False, "enable_progress_bar": False},
        "model": {"class_path": "lit_align.modules.reward.RewardModule", "init_args": {
            "backbone": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "head": "sequence_classification",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
        }},
        "data": {"path": str(shared_data / HH), "format": "hh_rlhf", "limit": 4, "val_fraction": 0.0,
                 "max_prompt_length": 128, "max_completion_length": 64},
    }
    (tmp / "common.yaml").write_text(yaml.safe_dump(common))
    record = {"model_attrs": ["model"], "generate": False}
    one = fit(tmp, "one", [tmp / "common.yaml"],
              {"trainer": {"devices": 1, "default_root_dir": str(tmp / "one")},
               "model": {"init_args": {"export_dir": str(tmp / "one_export")}}, "data": {"batch_size": 4}}, **record)
    # activation checkpointing recomputes the same math: the losses must still match
    two = fit(tmp, "two", [tmp / "common.yaml", FSDP2],
              {"trainer": {"devices": 2, "default_root_dir": str(tmp / "two"),
                           "strategy": {"init_args": {"activation_checkpointing": True}}},
               "data": {"batch_size": 2}}, **record)
    (ckpt,) = (tmp / "two" / "checkpoints").iterdir()
    return {"tmp": tmp, "one": one, "two": two, "ckpt": ckpt, "one_export": tmp / "one_export"}


def test_reward_model_fsdp2_losses_match_one_process(reward_runs):
    one, two = reward_runs["one"]["losses"], reward_runs["two"]["losses"]
    assert len(one) == len(two) == 3 and reward_runs["two"]["world_size"] == 2
    assert one[0] - one[-1] > 1e-2
    for a, b in zip(one, two):
        assert a == pytest.approx(b, abs=1e-5)


def test_reward_model_fsdp2_units(reward_runs):
    report = reward_runs["two"]["sharding"]["model"]
    assert report["num_dtensor"] == report["num_params"] > 0
    assert report["not_split_in_world_parts"] == []
    # the [1, h] score head (peft keeps a frozen original and a trained copy) cannot halve dim 0
    assert report["uneven_dim0"] == ["base_model.model.score.modules_to_save.default.weight",
                                     "base_model.model.score.original_module.weight"]
    # 2 blocks + 2 adapter groups + the trained score head + root; none mixes frozen and trainable
    assert report["units"] == 6 and report["mixed_units"] == []
    assert report["activation_checkpointing"]
    assert not reward_runs["one"]["sharding"]["model"]["activation_checkpointing"]


def test_reward_model_sharded_checkpoint_exports(reward_runs):
    from transformers import AutoModelForSequenceClassification

    assert reward_runs["ckpt"].is_dir() and len(list(reward_runs["ckpt"].glob("*.distcp"))) == 2
    dest = reward_runs["tmp"] / "exported"
    run("-m", "lit_align.cli", "export", "--checkpoint", str(reward_runs["ckpt"]), "--out_dir", str(dest), timeout=180)
    ids = torch.arange(3, 40).unsqueeze(0)
    scores = {}
    for name, path in (("sharded", dest), ("one_process", reward_runs["one_export"])):
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        assert model.config.num_labels == 1
        with torch.no_grad():
            scores[name] = model(ids).logits
    torch.testing.assert_close(scores["sharded"], scores["one_process"], rtol=0, atol=1e-5)


def test_grpo_under_fsdp2_generates_with_gathered_parameters(shared_data, tiny_model_dir, tmp_path):
    """GRPO samples with `generate` on the sharded LoRA policy inside `gathered_parameters`, scores
    and trains on 2 processes (without gathering, peft's generate fails on the sharded embeddings)."""
    overrides = {
        "trainer": {"accelerator": "cpu", "devices": 2, "max_steps": 2, "limit_val_batches": 0,
                    "val_check_interval": None, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lit_align.CompletionsLogger", "init_args": {"every_n_steps": 1}}]},
        "model": {"init_args": {
            "policy": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "reward_funcs": ["toy_rewards:a_fraction"], "sampling": {"num_generations": 4, "max_new_tokens": 24},
            "export_dir": None,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
        }},
        "data": {"path": str(shared_data / HH), "limit": 4, "val_fraction": 0.0, "batch_size": 1,
                 "max_prompt_length": 64},
    }
    result = fit(tmp_path, "grpo", [str(ROOT / "configs" / "grpo_function.yaml"), FSDP2], overrides,
                 model_attrs=["policy"], generate=True)
    assert result["world_size"] == 2 and result["global_step"] == 2
    assert all(abs(loss) < 1e3 for loss in result["losses"]) and len(result["losses"]) == 2
    policy = result["sharding"]["policy"]
    assert policy["num_dtensor"] == policy["num_params"] and policy["mixed_units"] == []
    assert len(result["generated"]) > 0  # the recorder's own gathered generate after training
    import csv

    (table,) = tmp_path.glob("**/completions.csv")
    rows = list(csv.DictReader(table.open()))
    assert sorted({r["step"] for r in rows}) == ["0", "1"] and "a_fraction" in rows[0]


def test_fsdp1_wrap_policy_runs_under_fully_sharded_data_parallel(tiny_model_dir, tmp_path):
    """The FSDP v1 units of configs/strategy/fsdp.yaml, with torch's FSDP on CPU (see the script)."""
    import json

    out = tmp_path / "fsdp1.json"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPTS / "fsdp1_policy.py"),
        str(tiny_model_dir), str(out), timeout=180)
    result = json.loads(out.read_text())
    blocks = [f"{m}.layers.{i}" for m in ("policy.base_model.model.model", "reference.model") for i in range(2)]
    adapters = [f"policy.base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.default"
                for i in range(2) for ab in "AB"]
    assert result["units"] == sorted(["", *blocks, *adapters])  # "" is the root
    assert result["mixed_units"] == []
    assert result["params_with_grad"] == 4 and 0 < result["loss"] < 20


@pytest.mark.slow
def test_smollm2_lora_dpo_under_fsdp2_and_export(shared_data, tmp_path):
    """Real SmolLM2-135M (30 blocks, tied embeddings), LoRA DPO with the LoRA-base reference: one
    FSDP2 step on 2 processes, then the sharded checkpoint exports and generates what the run did."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_align.export import export

    overrides = {
        "trainer": {"accelerator": "cpu", "devices": 2, "max_steps": 1, "accumulate_grad_batches": 1,
                    "limit_val_batches": 0, "val_check_interval": 1.0, "logger": False,
                    "default_root_dir": str(tmp_path)},
        "model": {"init_args": {"reference": "lora_base", "export_dir": None}},
        "data": {"path": str(shared_data / HH), "limit": 2, "val_fraction": 0.0, "batch_size": 1,
                 "max_prompt_length": 64, "max_completion_length": 32},
    }
    result = fit(tmp_path, "smol", [str(ROOT / "configs" / "dpo.yaml"), FSDP2], overrides)
    policy = result["sharding"]["policy"]
    assert policy["units"] == 61 and policy["mixed_units"] == []  # 30 blocks + 30 adapter groups + root
    assert policy["not_split_in_world_parts"] == [] and policy["num_dtensor"] == policy["num_params"]
    assert result["losses"][0] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1: log 2
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    dest = export(str(ckpt), str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tok = AutoTokenizer.from_pretrained(dest)
    greedy = model.generate(**tok("Human: tell me a joke.", return_tensors="pt"), max_new_tokens=4,
                            do_sample=False, pad_token_id=tok.pad_token_id)
    assert result["generated"] == greedy[0].tolist()
