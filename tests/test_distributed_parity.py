"""2-process runs (gloo, CPU) against a 1-process run on the same data and seeds: losses and
final weights. Subprocesses of `lit-align fit` with a timeout (tests/dist_scripts/harness.py);
pytest itself never joins a process group.

* DPO under DDP, with the frozen reference copy and with `reference: cached` (the disk cache
  filled by the ranks before training; tests/test_refcache.py has the 1-process checks).
* GRPO under FSDP2 with LoRA and the KL to the LoRA base. Sampling is GRPOModule's own, per
  prompt with a prompt-derived seed (tests/dist_scripts/parity.py), so a prompt gets the same
  completions whichever process holds it.

Every run holds 4 rows, one global batch per step: Lightning reshuffles a distributed run's
sampler every epoch, so only a batch holding every row is the same in both runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
from harness import FSDP2, ROOT, run  # noqa: E402

HH = "hh_rlhf_harmless_base_test.jsonl.gz"
DDP = str(ROOT / "configs" / "strategy" / "ddp.yaml")
PROMPTS = [f"Tell me about topic number {i}." for i in range(4)]

pytestmark = pytest.mark.distributed


def fit(tmp: Path, name: str, configs: list, overrides: dict) -> dict:
    """`lit-align fit` with a ParityRecorder: {"losses", "world_size", "global_step", "weights"}."""
    record = tmp / f"{name}.json"
    overrides.setdefault("trainer", {})["callbacks"] = [
        {"class_path": "parity.ParityRecorder", "init_args": {"path": str(record)}}
    ]
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(overrides))
    run("-m", "lit_align.cli", "fit", *[a for c in configs for a in ("-c", str(c))], "-c", str(config))
    result = json.loads(record.read_text())
    result["weights"] = torch.load(record.with_suffix(".pt"), weights_only=True)
    return result


def assert_same_weights(a: dict, b: dict, start: dict, atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    assert max(float((a[n] - start[n]).abs().max()) for n in a) > 1e-3  # training moved them
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=atol, msg=name)


# ---------------------------------------------------------------------------- DPO, DDP
@pytest.fixture(scope="module")
def dpo_runs(shared_data, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_ddp")
    common = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "limit_val_batches": 0, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False},
        "model": {"init_args": {"policy": {"name_or_path": str(tiny_model_dir)}, "reference": "copy",
                                "reference_cache_dir": str(tmp / "ref_cache")}},
        "data": {"path": str(shared_data / HH), "limit": 4, "val_fraction": 0.0},
    }
    (tmp / "common.yaml").write_text(yaml.safe_dump(common))
    base = [ROOT / "configs" / "dpo_tiny.yaml", tmp / "common.yaml"]
    one = fit(tmp, "one", base, {"trainer": {"devices": 1}, "data": {"batch_size": 4}})
    two = {"trainer": {"devices": 2}, "data": {"batch_size": 2}}
    ddp = fit(tmp, "ddp", [*base, DDP], two)
    cached = fit(tmp, "ddp_cached", [*base, DDP], {**two, "model": {"init_args": {"reference": "cached"}}})
    return {"one": one, "ddp": ddp, "cached": cached, "cache_dir": tmp / "ref_cache"}


def test_dpo_ddp_losses_and_weights_match_one_process(dpo_runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    one, ddp = dpo_runs["one"], dpo_runs["ddp"]
    assert one["world_size"] == 1 and ddp["world_size"] == 2 and one["global_step"] == ddp["global_step"] == 3
    assert len(one["losses"]) == len(ddp["losses"]) == 3
    assert abs(one["losses"][-1] - one["losses"][0]) > 1e-3
    for a, b in zip(one["losses"], ddp["losses"]):
        assert b == pytest.approx(a, abs=1e-5)
    start = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()}
    assert_same_weights(one["weights"], ddp["weights"], start, atol=1e-5)


def test_dpo_ddp_with_the_cached_reference_equals_the_copy(dpo_runs):
    ddp, cached = dpo_runs["ddp"], dpo_runs["cached"]
    for a, b in zip(ddp["losses"], cached["losses"]):
        assert b == pytest.approx(a, abs=1e-6)
    for name, w in ddp["weights"].items():
        torch.testing.assert_close(cached["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    (table,) = dpo_runs["cache_dir"].glob("*.pt")  # val_fraction 0: the train split only, written once
    assert torch.load(table, weights_only=True).shape == (4, 2)
    assert not list(dpo_runs["cache_dir"].glob("*.tmp*"))


# ---------------------------------------------------------------------------- GRPO, FSDP2
@pytest.fixture(scope="module")
def grpo_runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo_fsdp2")
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "limit_val_batches": 0, "val_check_interval": None,
                    "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp)},  # where LightningCLI saves config.yaml (not the repository)
        "model": {"class_path": "parity.PerPromptSeedGRPO", "init_args": {
            "policy": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "reward_funcs": ["parity:length_reward"], "sampling": {"num_generations": 2, "max_new_tokens": 12,
                                                                 "temperature": 1.0},
            "loss": {"loss_type": "dapo", "beta": 0.04},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
        }},
        "data": {"path": str(data), "format": "generic", "mode": "prompts", "val_fraction": 0.0,
                 "max_prompt_length": 32},
    }
    (tmp / "common.yaml").write_text(yaml.safe_dump(common))
    one = fit(tmp, "one", [tmp / "common.yaml"], {"trainer": {"devices": 1}, "data": {"batch_size": 4}})
    two = fit(tmp, "two", [tmp / "common.yaml", FSDP2], {"trainer": {"devices": 2}, "data": {"batch_size": 2}})
    return {"one": one, "two": two}


def test_grpo_fsdp2_losses_and_weights_match_one_process(grpo_runs):
    one, two = grpo_runs["one"], grpo_runs["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["global_step"] == two["global_step"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 2
    assert any(abs(x) > 1e-4 for x in one["losses"])
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, abs=1e-5)
    start = {n: torch.zeros_like(w) if "lora_B" in n else w for n, w in one["weights"].items()}  # B starts at 0
    assert all("lora_" in n for n in one["weights"])
    assert_same_weights(one["weights"], two["weights"], start, atol=1e-5)
