"""Kill and resume: a SIGKILLed run resumed from its last checkpoint ends bit-identical
(weights, logged metrics, re-ranker state) to a run that was never interrupted (CPU, fp32)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lit_align.models  # noqa: F401  (allow-lists PolicyConfig for torch.load(weights_only=True))

SCRIPTS = Path(__file__).resolve().parent / "reliability_scripts"
HH = "hh_rlhf_harmless_base_test.jsonl.gz"
TIMEOUT = 900


def run(script: str, *args, check: bool = True, background: bool = False):
    cmd = [sys.executable, str(SCRIPTS / script), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_stitched_logs_equal(full: list, killed: list, resumed: list, resume_step: int) -> None:
    """What the killed run logged is a prefix of the full log, the resumed run's log is its
    suffix, and together they cover it (rows logged after the checkpoint are logged again)."""
    assert killed == full[: len(killed)]
    assert resumed == full[len(full) - len(resumed):]
    assert len(killed) + len(resumed) >= len(full)
    assert resumed[0]["step"] == resume_step, "the resumed run starts right after its checkpoint"


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory, tiny_model_dir):
    from lit_align.probes.probe import build_probe

    torch.manual_seed(1)
    probe = build_probe("hybrid", 32, [1, 2])
    with torch.no_grad():
        probe.weight.normal_(0, 0.3)  # a probe with opinions, so the re-ranker flips pairs
    return probe.save(tmp_path_factory.mktemp("probe") / "probe.safetensors")


def test_dpo_kill_and_resume_is_bit_exact(tiny_model_dir, shared_data, probe_file, tmp_path):
    kill_at = int(os.environ.get("LIT_ALIGN_KILL_STEP", random.randint(4, 12)))
    print(f"SIGKILL at the start of step {kill_at} (set LIT_ALIGN_KILL_STEP to replay)")
    common = ["--model", tiny_model_dir, "--data", shared_data / HH, "--probe", probe_file, "--max-steps", 14]
    full, part = tmp_path / "full", tmp_path / "part"
    background = run("train_dpo.py", *common, "--out", full, background=True)
    killed = run("train_dpo.py", *common, "--out", part, "--kill-at-step", kill_at, check=False)
    out, _ = background.communicate(timeout=TIMEOUT)
    assert background.returncode == 0, out[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (part / "final.pt").exists()

    last = torch.load(part / "ckpts" / "last.ckpt", weights_only=True)
    resume_step = last["global_step"]
    assert 0 < resume_step <= kill_at
    killed_log = rows(part / "metrics.jsonl")
    control = tmp_path / "control"
    shutil.copytree(part, control)

    run("train_dpo.py", *common, "--out", part, "--resume")
    assert_same_weights(full / "final.pt", part / "final.pt")
    assert json.loads((part / "reranker.json").read_text()) == json.loads((full / "reranker.json").read_text())
    resumed_log = rows(part / "metrics.jsonl")[len(killed_log):]
    assert_stitched_logs_equal(rows(full / "metrics.jsonl"), killed_log, resumed_log, resume_step)
    assert any("rerank/flipped_total" in r and "probe/loss" in r for r in resumed_log)

    # control: the same resume without the RNG states drifts (attention dropout draws differ),
    # so the equality above is not an accident of a deterministic model
    run("train_dpo.py", *common, "--out", control, "--resume", "--no-rng-states")
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_weights(full / "final.pt", control / "final.pt")


def test_grpo_kill_and_resume_is_bit_exact(tiny_model_dir, shared_data, tmp_path):
    kill_at = int(os.environ.get("LIT_ALIGN_KILL_STEP_GRPO", random.randint(4, 9)))
    print(f"SIGKILL at the start of GRPO step {kill_at} (set LIT_ALIGN_KILL_STEP_GRPO to replay)")
    common = ["--model", tiny_model_dir, "--data", shared_data / HH, "--max-steps", 10]
    full, part = tmp_path / "full", tmp_path / "part"
    background = run("train_grpo.py", *common, "--out", full, background=True)
    killed = run("train_grpo.py", *common, "--out", part, "--kill-at-step", kill_at, check=False)
    out, _ = background.communicate(timeout=TIMEOUT)
    assert background.returncode == 0, out[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    import lit_align.modules.grpo_config  # noqa: F401  (GRPO's option dataclasses: allowed in a weights-only load)

    resume_step = torch.load(part / "ckpts" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < resume_step <= kill_at
    killed_log = rows(part / "metrics.jsonl")
    run("train_grpo.py", *common, "--out", part, "--resume")
    assert_same_weights(full / "final.pt", part / "final.pt")
    resumed_log = rows(part / "metrics.jsonl")[len(killed_log):]
    assert_stitched_logs_equal(rows(full / "metrics.jsonl"), killed_log, resumed_log, resume_step)
    assert all("reward" in r and "kl" in r for r in resumed_log)
