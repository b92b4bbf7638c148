"""Scale-out: FSDP2 through Lightning's ModelParallelStrategy on 2 CPU processes (gloo).

Every multi-process run is a subprocess script under tests/dist_scripts/ with a timeout, so a
hang fails the test instead of blocking. Pytest itself never joins a process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "dist_scripts"
TIMEOUT = 240  # seconds per script run; a deadlock fails instead of hanging CI

pytestmark = pytest.mark.distributed


def run_script(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)  # let Lightning's launcher start the processes
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{args[0]} did not finish in {timeout}s (hang?)\n{(e.stderr or b'')[-3000:]!s}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def lora_runs(tiny_model_dir, tmp_path_factory):
    """The tiny LoRA run on 1 process and on 2 FSDP2 processes."""
    out = tmp_path_factory.mktemp("fsdp2_lora")
    script = str(SCRIPTS / "fsdp2_tiny.py")
    for devices in (1, 2):
        run_script(script, "--model-dir", str(tiny_model_dir), "--out", str(out), "--devices", str(devices), "--lora")
    results = {d: json.loads((out / f"result_{d}.json").read_text()) for d in (1, 2)}
    return out, results


def test_fsdp2_losses_match_one_process(lora_runs):
    _, results = lora_runs
    one, two = results[1]["losses"], results[2]["losses"]
    assert len(one) == len(two) == 4
    assert results[2]["global_step"] == 4
    # the weights changed (the loss moved), and both runs moved identically
    assert abs(one[-1] - one[0]) > 1e-3
    for a, b in zip(one, two):
        assert a == pytest.approx(b, abs=1e-5)


def test_fsdp2_parameters_are_sharded_in_separate_lora_units(lora_runs):
    _, results = lora_runs
    report = results[2]["sharding"]
    assert report["num_params"] > 0 and report["num_dtensor"] == report["num_params"]
    assert report["not_half"] == []  # every local shard holds half of dim 0
    # 2 blocks + 2 adapter groups + root; no unit mixes frozen and trainable parameters
    assert report["units"] == 5
    assert report["mixed_units"] == []


def test_sharded_checkpoint_is_a_dcp_directory_and_resume_continues(lora_runs):
    out, results = lora_runs
    ckpt = Path(results[2]["checkpoint"])
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    # steps 3-4 ran after resuming from it, and equal the uninterrupted-equivalent 1-process run
    assert results[2]["steps_before_save"] == 2


def test_generation_with_gathered_parameters_matches_unsharded(lora_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, results = lora_runs
    model = AutoModelForCausalLM.from_pretrained(out / "final_2").eval()
    tok = AutoTokenizer.from_pretrained(out / "final_2")
    prompt = tok("Human: tell me a joke.", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert results[2]["generated"] == expected[0].tolist()


@pytest.mark.parametrize("devices", [2, 1], ids=["sharded_dir", "full_ckpt"])
def test_export_checkpoint_loads_with_from_pretrained(lora_runs, devices, tmp_path):
    from transformers import AutoModelForCausalLM

    out, results = lora_runs
    ckpt = out / ("sharded.ckpt" if devices == 2 else "full.ckpt")
    assert ckpt.is_dir() == (devices == 2)
    dest = tmp_path / "hf"
    run_script("-m", "lit_align.cli", "export", "--checkpoint", str(ckpt), "--out_dir", str(dest), timeout=120)
    exported = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert not any("lora" in k for k in exported.state_dict())  # merged
    # the run gathered and saved the same weights itself when it wrote the checkpoint
    expected = AutoModelForCausalLM.from_pretrained(out / f"saved_{devices}").eval()
    start = AutoModelForCausalLM.from_pretrained(out / "saved_1").eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, expected(ids).logits, rtol=0, atol=1e-6)
        # and the 1- and 2-process runs trained to the same weights
        torch.testing.assert_close(expected(ids).logits, start(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_as_lora_adapter(lora_runs, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out, _ = lora_runs
    dest = tmp_path / "adapter"
    run_script("-m", "lit_align.cli", "export", "--checkpoint", str(out / "sharded.ckpt"), "--out_dir", str(dest),
               "--merge_lora", "false", timeout=120)
    assert (dest / "adapter_config.json").is_file() and not (dest / "model.safetensors").exists()
    adapted = AutoPeftModelForCausalLM.from_pretrained(dest).eval()
    expected = AutoModelForCausalLM.from_pretrained(out / "saved_2").eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, expected(ids).logits, rtol=0, atol=1e-5)
