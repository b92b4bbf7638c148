"""Scale-out through `lit-align fit`: FSDP2 (ModelParallelStrategy) on 2 CPU processes with gloo.

Every run is a subprocess of the real command line with a timeout, so a hang fails the test
instead of blocking CI; pytest itself never joins a process group. The runs use the tiny
model with LoRA, a frozen reference copy and 4 real HH-RLHF pairs, i.e. one global batch per
step (Lightning reshuffles a distributed run's training sampler every epoch, so only a batch
holding every row is the *same* global batch in the 1- and 2-process runs):

    1 process,   batch 4, 4 steps                      -> losses, full .ckpt, module export
    2 processes, batch 2 each, 2 steps                 -> sharded checkpoint directory
    2 processes, resume from it to 4 steps             -> losses of steps 3-4, final sharded checkpoint
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
from harness import FSDP2, ROOT, fit  # noqa: E402

HH = "hh_rlhf_harmless_base_test.jsonl.gz"
PROMPT = "Human: tell me a joke."  # the recorder's generation prompt
DPO_TINY = str(ROOT / "configs" / "dpo_tiny.yaml")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def dpo_runs(shared_data, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_fsdp2")
    common = {
        "trainer": {"accelerator": "cpu", "limit_val_batches": 0, "val_check_interval": 1.0, "logger": False},
        "model": {"init_args": {
            "policy": {"name_or_path": str(tiny_model_dir),
                       "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}},
            "reference": "copy",
        }},
        "data": {"path": str(shared_data / HH), "limit": 4, "val_fraction": 0.0},
    }
    (tmp / "common.yaml").write_text(yaml.safe_dump(common))
    base = [DPO_TINY, tmp / "common.yaml"]
    one = fit(tmp, "one", base, {"trainer": {"devices": 1, "max_steps": 4, "default_root_dir": str(tmp / "one")},
                                 "model": {"init_args": {"export_dir": str(tmp / "one_export")}},
                                 "data": {"batch_size": 4}})
    two = {"devices": 2, "default_root_dir": str(tmp / "two")}
    first = fit(tmp, "two_a", [*base, FSDP2], {"trainer": {**two, "max_steps": 2}, "data": {"batch_size": 2}})
    saved = tmp / "two" / "checkpoints" / "epoch=1-step=2.ckpt"
    resumed = fit(tmp, "two_b", [*base, FSDP2], {"trainer": {**two, "max_steps": 4}, "data": {"batch_size": 2}},
                  extra=("--ckpt_path", str(saved)))
    final = [p for p in (tmp / "two" / "checkpoints").iterdir() if "step=4" in p.name]
    return {"tmp": tmp, "one": one, "first": first, "resumed": resumed, "saved": saved, "final": final,
            "full_ckpt": tmp / "one" / "checkpoints" / "epoch=3-step=4.ckpt", "one_export": tmp / "one_export"}


def test_dpo_fsdp2_losses_match_one_process_through_resume(dpo_runs):
    one, first, resumed = dpo_runs["one"], dpo_runs["first"], dpo_runs["resumed"]
    assert first["world_size"] == resumed["world_size"] == 2 and one["world_size"] == 1
    assert resumed["start_step"] == 2 and resumed["global_step"] == 4
    two = first["losses"] + resumed["losses"]
    assert len(one["losses"]) == len(two) == 4
    assert one["losses"][0] - one["losses"][-1] > 1e-3  # training moved the loss
    # steps 3-4 need the restored LoRA weights *and* AdamW moments to match
    for a, b in zip(one["losses"], two):
        assert a == pytest.approx(b, abs=1e-5)


def test_dpo_fsdp2_shards_policy_and_reference(dpo_runs):
    sharding = dpo_runs["first"]["sharding"]
    policy, reference = sharding["policy"], sharding["reference"]
    for report in (policy, reference):
        assert report["num_dtensor"] == report["num_params"] > 0
        assert report["not_split_in_world_parts"] == []  # every local shard is half of dim 0
        assert report["uneven_dim0"] == []
        assert report["mixed_units"] == []
    # policy: 2 blocks + 2 blocks' adapter groups + root; the frozen reference: 2 blocks + root
    assert policy["units"] == 5 and policy["num_trainable"] == 12
    assert reference["units"] == 3 and reference["num_trainable"] == 0
    assert dpo_runs["one"]["sharding"]["policy"]["num_dtensor"] == 0


def test_sharded_checkpoint_is_a_directory_of_shards(dpo_runs):
    for ckpt in [dpo_runs["saved"], *dpo_runs["final"]]:
        assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
        assert len(list(ckpt.glob("*.distcp"))) == 2  # one file per rank
    assert len(dpo_runs["final"]) == 1
    assert dpo_runs["full_ckpt"].is_file()


def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.arange(3, 40).unsqueeze(0)).logits


def test_export_sharded_checkpoint(dpo_runs, tiny_model_dir):
    """In this process (DCP reads the shards without a process group); the `lit-align export`
    command line itself runs in tests/test_distributed_modules.py."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_align.export import export

    dest = export(str(dpo_runs["final"][0]), str(dpo_runs["tmp"] / "exported_sharded"))
    exported = logits(dest)
    # the 2-process weights after resume = the 1-process run's own export, and not the base
    torch.testing.assert_close(exported, logits(dpo_runs["one_export"]), rtol=0, atol=1e-5)
    assert (exported - logits(tiny_model_dir)).abs().max() > 1e-3
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert not any("lora" in k for k in model.state_dict())
    # generation under gathered_parameters inside the run (rank 0) = the exported model's
    tok = AutoTokenizer.from_pretrained(dest)
    greedy = model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=4, do_sample=False,
                            pad_token_id=tok.pad_token_id)
    assert dpo_runs["resumed"]["generated"] == greedy[0].tolist()


def test_export_full_lean_checkpoint(dpo_runs, tmp_path):
    from lit_align.export import export

    ckpt = torch.load(dpo_runs["full_ckpt"], map_location="cpu", weights_only=False)
    assert ckpt["lit_align_frozen_keys"]  # frozen base and reference weights were left out
    dest = export(str(dpo_runs["full_ckpt"]), str(tmp_path / "hf"))
    torch.testing.assert_close(logits(dest), logits(dpo_runs["one_export"]), rtol=0, atol=0)


def test_export_sharded_checkpoint_as_adapter(dpo_runs, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from lit_align.export import export

    dest = export(str(dpo_runs["final"][0]), str(tmp_path / "adapter"), merge_lora=False)
    assert (dest / "adapter_config.json").is_file() and not (dest / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        adapted = model(torch.arange(3, 40).unsqueeze(0)).logits
    torch.testing.assert_close(adapted, logits(dpo_runs["one_export"]), rtol=0, atol=1e-5)


def test_export_names_what_is_missing(tmp_path):
    from lit_align.export import export

    with pytest.raises(FileNotFoundError, match="sharded checkpoint directory"):
        export(str(tmp_path / "nope.ckpt"), str(tmp_path / "out"))
    torch.save({"state_dict": {}, "hyper_parameters": {"beta": 0.1}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="no PolicyConfig"):
        export(str(tmp_path / "x.ckpt"), str(tmp_path / "out"))


def test_export_with_dtype_and_base_model_override(dpo_runs, tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from lit_align.export import export

    moved = tmp_path / "base_moved_here"  # the run's base model directory is elsewhere now
    shutil.copytree(tiny_model_dir, moved)
    dest = export(str(dpo_runs["final"][0]), str(tmp_path / "bf16"), dtype="bfloat16", base_model=str(moved))
    model = AutoModelForCausalLM.from_pretrained(dest, dtype="auto")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        bf16 = model.float().eval()(torch.arange(3, 40).unsqueeze(0)).logits
    torch.testing.assert_close(bf16, logits(dpo_runs["one_export"]), rtol=0.02, atol=0.02)
