"""The benchmark scripts run end to end (`--quick` on llama-1m, 1-2 timed steps), so they cannot
rot: each writes its JSON (to a temporary directory) with the fields docs/benchmarks.md quotes,
consistent with one another. Timings are not asserted (the machine is shared); the scripts'
full-size commands are in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, results: Path) -> dict:
    env = dict(os.environ, LIT_ALIGN_BENCH_RESULTS=str(results), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", f"bench.{script}", "--quick", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = results.glob(f"{script}_*quick.json")
    return json.loads(path.read_text())


def test_bench_rerank_quick(shared_data, tmp_path):
    r = bench("rerank", "--steps", "2", "--warmup", "1", "--samples", "2", "--new-tokens", "8",
              "--sampling-repeats", "2", results=tmp_path)
    assert r["sampler"] == "lit_align.generation.LeanGenerator"
    assert r["dpo_step_with_probe"]["n"] == 2 and r["online_sampling"]["n"] == 2
    assert r["rerank_interleaved_with_sampling"]["n"] == 2  # one re-ranking per sampling run
    assert 0 < r["generated_tokens_per_batch"] <= r["generated_tokens_expected"] == 8 * 2 * 8
    ratio = r["online_sampling"]["median_s"] / r["rerank_interleaved_with_sampling"]["median_s"]
    assert r["online_over_rerank"] == pytest.approx(ratio)


def test_bench_dpo_quick_alternates_the_order(shared_data, trl, tmp_path):
    r = bench("dpo", "--steps", "2", "--warmup", "1", "--no-rss", "--baseline", results=tmp_path)
    (run,) = r["results"]
    assert run["config"] == "llama-1m"
    assert run["lit_align"]["n"] == run["trl"]["n"] == run["lit_align_padded"]["n"] == 2
    assert run["order"].startswith("ABBA: TRL first on 1 of 2 timed steps")
    assert "re-ranking hook inside" in run["lit_align_window"]
    assert run["lit_align"]["step_flops"] > 0 and run["trl"]["step_flops"] > 0
    assert run["speedup_vs_trl"] == pytest.approx(run["trl"]["median_s"] / run["lit_align"]["median_s"])


def test_bench_grpo_quick_reports_time_per_generated_token(shared_data, trl, tmp_path):
    r = bench("grpo", "--steps", "2", "--warmup", "1", "--no-rss", results=tmp_path)
    for side in ("lit_align", "trl"):
        assert r[side]["n"] == 2
        assert 0 < r[side]["generated_tokens_per_step_median"] <= 4 * 2 * 32  # G x prompts x new tokens
        assert r[side]["median_s_per_generated_token"] > 0
    assert 0 < r["lit_align_mean_completion_length"] <= 32 and 0 < r["trl_mean_completion_length"] <= 32
    ratio = r["lit_align"]["median_s_per_generated_token"] / r["trl"]["median_s_per_generated_token"]
    assert r["per_token_time_ratio_lit_over_trl"] == pytest.approx(ratio)
