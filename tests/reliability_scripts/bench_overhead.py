"""Wall-clock cost of the reliability machinery on a SmolLM2-135M-sized model (random weights,
built from the converted SmolLM2 config when it is cached, else a Llama of the same shape).

    python tests/reliability_scripts/bench_overhead.py [--repeats 5]

Prints: one forward+backward of a [4, 128] batch, the guard's per-step gradient check, and a
checkpoint save of the model's state dict through Lightning's TorchCheckpointIO and through
AtomicCheckpointIO (median of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402

from lit_align.reliability import AtomicCheckpointIO, _local  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (4, 128))

    def step():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()

    step_s = median_seconds(step, args.repeats)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    check_s = median_seconds(lambda: bool(torch.isfinite(torch.nn.utils.get_total_norm([_local(g) for g in grads]))), args.repeats)
    checkpoint = {"state_dict": model.state_dict(), "global_step": 1}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        plain_s = median_seconds(lambda: TorchCheckpointIO().save_checkpoint(checkpoint, f"{tmp}/a.ckpt"), args.repeats)
        atomic_s = median_seconds(lambda: AtomicCheckpointIO().save_checkpoint(checkpoint, f"{tmp}/b.ckpt"), args.repeats)
        size_mb = Path(f"{tmp}/b.ckpt").stat().st_size / 2**20
    print(f"model: {n / 1e6:.1f}M parameters, checkpoint {size_mb:.0f} MiB, torch threads {torch.get_num_threads()}")
    print(f"forward+backward [4, 128]:         {step_s * 1e3:8.1f} ms")
    print(f"NonFiniteGuard gradient check:     {check_s * 1e3:8.1f} ms ({100 * check_s / step_s:.1f}% of the step)")
    print(f"save, Lightning TorchCheckpointIO: {plain_s * 1e3:8.1f} ms")
    print(f"save, AtomicCheckpointIO (fsync):  {atomic_s * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
