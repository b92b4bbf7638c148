"""The co-trained probe's own optimiser under data parallelism, through `lit-align fit` on 2 CPU
processes (gloo), against one process on the same global batch (4 pairs = every row, so each
step's global batch is the same in both; see tests/test_distributed.py):

    1 process,  batch 4, 4 steps                          -> the reference probe
    FSDP2, 2 x batch 2, 2 steps, then resumed to 4 steps   -> the probe's Adam state through a sharded checkpoint
    DDP,   2 x batch 2, 4 steps

FSDP2 shards only the policy: the probe stays replicated and no DDP wrapper averages its
gradients, so the module averages them itself before the probe's Adam steps. Every rank must
end with the one-process probe. The decision is per pair (flip, pair granularity), so it does
not depend on how the batch is split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
from harness import FSDP2, ROOT, fit  # noqa: E402

HH = "hh_rlhf_harmless_base_test.jsonl.gz"
DDP = str(ROOT / "configs" / "strategy" / "ddp.yaml")
CALLBACK = "tests.test_rerank_distributed.ProbeWeights"

pytestmark = pytest.mark.distributed


class ProbeWeights(L.Callback):
    """Each rank writes its probe's weights and its probe optimiser's step count to `path`.rank<r>.json."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, module):
        steps = [int(s["step"]) for s in module.probe_optimizer.state_dict()["state"].values()]
        weights = {n: p.detach().cpu().reshape(-1).tolist() for n, p in module.probe.named_parameters()}
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps({"steps": steps, "probe": weights}))


def read(path: str, ranks: int) -> list[dict]:
    return [json.loads(Path(f"{path}.rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(shared_data, tiny_model_dir, tmp_path_factory):
    from lit_align.probes import HybridProbe

    tmp = tmp_path_factory.mktemp("rerank_dist")
    torch.manual_seed(0)
    probe = HybridProbe(32, [1, 2])
    with torch.no_grad():  # a probe with opinions: it flips some pairs
        probe.weight.normal_(std=0.5)
        probe.vote.weight.normal_()
    common = {
        "trainer": {"accelerator": "cpu", "limit_val_batches": 0, "val_check_interval": 1.0, "logger": False},
        "model": {"init_args": {
            "policy": {"name_or_path": str(tiny_model_dir)}, "reference": "copy", "loss_type": "conservative",
            "probe_path": str(probe.save(tmp / "probe.safetensors")), "co_train_probe": True,
        }},
        "data": {"path": str(shared_data / HH), "limit": 4, "val_fraction": 0.0,
                 "reranker": {"class_path": "lit_align.ConfidenceReRanker",
                              "init_args": {"action": "flip", "granularity": "pair"}}},
    }
    (tmp / "common.yaml").write_text(yaml.safe_dump(common))
    base = [str(ROOT / "configs" / "dpo_tiny.yaml"), tmp / "common.yaml"]

    def run(name, configs, devices, max_steps, batch, root, extra=()):
        out = str(tmp / name)
        record = fit(tmp, name, configs, {"trainer": {"devices": devices, "max_steps": max_steps, "default_root_dir": str(tmp / root)},
                                          "data": {"batch_size": batch}},
                     extra=(f"--trainer.callbacks+={CALLBACK}", f"--trainer.callbacks.path={out}", *extra), generate=False)
        return record, read(out, devices)

    one = run("one", base, 1, 4, 4, "one")
    fsdp2_a = run("fsdp2_a", [*base, FSDP2], 2, 2, 2, "fsdp2")
    saved = tmp / "fsdp2" / "checkpoints" / "epoch=1-step=2.ckpt"
    fsdp2_b = run("fsdp2_b", [*base, FSDP2], 2, 4, 2, "fsdp2", extra=("--ckpt_path", str(saved)))
    ddp = run("ddp", [*base, DDP], 2, 4, 2, "ddp")
    return {"tmp": str(tmp), "one": one, "fsdp2_a": fsdp2_a, "fsdp2_b": fsdp2_b, "ddp": ddp}


def assert_same_probe(a: dict, b: dict, atol: float):
    for name in a["probe"]:
        torch.testing.assert_close(torch.tensor(a["probe"][name]), torch.tensor(b["probe"][name]), rtol=0, atol=atol,
                                   msg=lambda m: f"{name}: {m}")


def test_the_probe_trains_one_step_per_policy_step(runs):
    from lit_align.probes import load_probe

    record, (one,) = runs["one"]
    assert set(one["steps"]) == {4} and record["global_step"] == 4
    start = load_probe(str(Path(runs["tmp"]) / "probe.safetensors")).weight.reshape(-1)
    assert (torch.tensor(one["probe"]["weight"]) - start).abs().max() > 1e-3  # co-training moved it


@pytest.mark.parametrize("name", ["fsdp2_b", "ddp"])
def test_every_rank_ends_with_the_one_process_probe(runs, name):
    record, ranks = runs[name]
    one_record, (one,) = runs["one"]
    assert record["world_size"] == 2 and record["global_step"] == 4
    assert_same_probe(ranks[0], ranks[1], atol=0.0)  # the replicas never drift apart
    assert_same_probe(one, ranks[0], atol=1e-5)
    # FSDP2: 2 probe steps before the checkpoint and 2 after it, on the restored Adam state
    assert all(set(r["steps"]) == {4} for r in ranks)
    if name == "fsdp2_b":
        assert all(set(r["steps"]) == {2} for r in runs["fsdp2_a"][1])
    assert record["losses"] == pytest.approx(one_record["losses"][-len(record["losses"]):], abs=1e-5)
