"""Shared benchmark harness: machine facts, real data, random Llamas, ABAB timing, peak RSS, reports.

Every bench script prints one JSON object and a Markdown table, and saves the JSON under
`bench/results/`. Timings are medians over steps after warm-up; lit_align and TRL steps
alternate (A B A B ...) so that load from other processes hits both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"
RESULTS = Path(os.environ.get("LIT_ALIGN_BENCH_RESULTS", ROOT / "bench" / "results"))  # the smoke test writes elsewhere

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------- machine
def versions() -> dict:
    import lightning
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    out.update({"lightning": lightning.__version__, "peft": peft.__version__})
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = None
    return out


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        **versions(),
    }


def matmul_peak(n: int = 1024, repeats: int = 10) -> dict:
    """float32 GEMM FLOP/s on this machine now: best (the peak) and median of `repeats` n×n×n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    flops = 2 * n**3
    return {"peak_flops": flops / min(times), "median_flops": flops / statistics.median(times), "n": n}


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- data and models
def require_data() -> Path:
    if not DATA.exists():
        raise SystemExit(f"benchmark data not found: {DATA} (see /work/shared/data/SOURCES.md)")
    return DATA


def hh_rows(limit: Optional[int] = None) -> list[dict]:
    """Real HH-RLHF harmless-base pairs through lit_align's own loader (bad rows skipped and counted)."""
    from lit_align.data.formats import load_rows

    rows = load_rows(str(require_data()), format="hh_rlhf", on_bad_rows="skip")
    return rows[:limit] if limit else rows


LLAMAS = {
    # name: (tokenizer, LlamaConfig kwargs). ~1M uses a 512-token byte BPE; ~30M SmolLM2's real 49k vocabulary.
    "llama-1m": ("tiny", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4)),
    "llama-30m": ("smollm2", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, tie_word_embeddings=True)),
}


def make_llama(name: str, out_dir: Path, seed: int = 0) -> Path:
    """A random Llama from LlamaConfig plus its tokenizer, saved as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lit_align.testing import make_tiny_tokenizer

    kind, kwargs = LLAMAS[name]
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    if kind == "tiny":
        tok = make_tiny_tokenizer(out_dir)
    else:
        from lit_align.models import smollm2_dir

        tok = AutoTokenizer.from_pretrained(smollm2_dir())
        tok.save_pretrained(out_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=kwargs["num_attention_heads"],
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad,
        bos_token_id=None,
        **{"tie_word_embeddings": False, **kwargs},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": total, "trainable_params": trainable}


# ---------------------------------------------------------------------------- timing
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """Wall-clock times per label; `time(label, fn)` runs fn once and records its duration."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def time(self, label: str, fn: Callable, record: bool = True):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        if record:
            self.times.setdefault(label, []).append(time.perf_counter() - start)
        return out

    def add(self, label: str, seconds: float) -> None:
        self.times.setdefault(label, []).append(seconds)

    def summary(self, label: str) -> dict:
        t = sorted(self.times[label])
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        return {"median_s": statistics.median(t), "p25_s": q[0], "p75_s": q[2], "n": len(t)}


def flops_of(fn: Callable) -> tuple[int, object]:
    """FLOPs torch counts (matmuls, attention, convolutions) while `fn` runs once, and fn's result."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return counter.get_total_flops(), out


# ---------------------------------------------------------------------------- both sides' set-up
def bench_trainer(n_steps: int, callbacks: list):
    """A bare Lightning Trainer for `n_steps` CPU steps: no logger, checkpoints, progress bar or validation."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=n_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def trl_cpu_args(**overrides) -> dict:
    """TRL config arguments every benchmark shares: float32 on the CPU, AdamW(lr 1e-6, wd 0) at a
    constant rate, no gradient checkpointing, no saving or reporting."""
    return dict(
        learning_rate=1e-6, weight_decay=0.0, optim="adamw_torch", lr_scheduler_type="constant",
        gradient_checkpointing=False, bf16=False, report_to=[], use_cpu=True, save_strategy="no", **overrides,
    )


# ---------------------------------------------------------------------------- subprocesses
# A worker's time limit: generous, since a SmolLM2 timing worker takes ~20 min on 2 quiet cores.
WORKER_TIMEOUT_S = float(os.environ.get("LIT_ALIGN_BENCH_TIMEOUT", 4 * 3600))


def run_isolated(module: str, args: list[str], timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Run `python -m module args` in a fresh process; it must print one line `RESULT <json>`.
    The time limit comes from LIT_ALIGN_BENCH_TIMEOUT (seconds; default 4 hours)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def print_result(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- reports
def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, result: dict, rows: list[dict], columns: list[str]) -> None:
    """Print the JSON and the Markdown table, and save the JSON as bench/results/<name>.json."""
    result = {"benchmark": name, "machine": result.pop("machine", machine()), "loadavg_end": list(os.getloadavg()), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print()
    print(markdown_table(rows, columns))
