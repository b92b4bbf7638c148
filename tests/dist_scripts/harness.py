"""Running `lit-align` as a subprocess for the distributed tests (imported by tests/test_distributed*.py).

Every run gets a timeout, so a deadlocked process group fails its test instead of blocking CI,
and a clean environment, so Lightning's own launcher starts the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent
TIMEOUT = 300  # seconds per run
FSDP2 = str(ROOT / "configs" / "strategy" / "fsdp2.yaml")


def run(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """`python *args` from the repository root; fails the test on a non-zero exit or a timeout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(SCRIPTS)]), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK"):
        env.pop(var, None)
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{' '.join(args[:4])} did not finish in {timeout}s (a hang?)\n{stderr[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def fit(tmp: Path, name: str, configs: list[str], overrides: dict, extra: tuple[str, ...] = (), **recorder) -> dict:
    """`lit-align fit -c configs... -c <name>.yaml extra...` with a DistRecorder; returns what it recorded."""
    record = tmp / f"{name}.json"
    # the list replaces the configs' trainer.callbacks: the overrides' own callbacks, then the recorder
    overrides.setdefault("trainer", {}).setdefault("callbacks", []).append(
        {"class_path": "recorder.DistRecorder", "init_args": {"path": str(record), **recorder}}
    )
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(overrides))
    args = [arg for c in configs for arg in ("-c", str(c))]
    run("-m", "lit_align.cli", "fit", *args, "-c", str(config), *extra)
    return json.loads(record.read_text())
