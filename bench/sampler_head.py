"""The decode loop's LM head in column blocks (lit_align.generation.linear.ChunkedHead) against the one matmul.

    python -m bench.sampler_head            # SmolLM2-135M-Instruct's head and decode loop, 1 thread
    python -m bench.sampler_head --quick    # the tiny test model in 128-column blocks (seconds)

Two measurements, each A/B interleaved (A B A B ...) so that other processes' load hits both alike:
* `head`: the head alone, `F.linear(x, W)` vs `ChunkedHead` on `x` of 1-32 rows (W: the model's
  tied 49 152 × 576 embedding): best and median CPU ms of --repeats calls each, and whether the
  logits are bit for bit equal.
* `step`: whole decode steps of `sample_ids`' Decoder on the 32 CoD prompts of bench.sampler
  (prefilled once), the steps alternating between the plain head and ChunkedHead, at 32, 16, 8, 4
  and 2 rows (ended rows are dropped from the decode forwards, so all these sizes occur).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import harness
from bench.sampler import load, prompts


def cpu_ms(fn) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


def summary(kind: str, rows: int, plain: list[float], chunked: list[float], **extra) -> dict:
    return {"measure": kind, "rows": rows, "plain best ms": min(plain), "blocks best ms": min(chunked),
            "plain median ms": statistics.median(plain), "blocks median ms": statistics.median(chunked),
            "× (medians)": statistics.median(plain) / statistics.median(chunked), **extra}


def head_alone(model, repeats: int) -> list[dict]:
    from lit_align.generation.linear import ChunkedHead

    head, out = model.get_output_embeddings(), []
    chunked = ChunkedHead(head)
    for rows in (32, 16, 8, 4, 2, 1):
        x = torch.randn(rows, 1, head.in_features, generator=torch.Generator().manual_seed(rows))
        equal = torch.equal(head(x), chunked(x))
        times = {"plain": [], "blocks": []}
        for _ in range(repeats):
            times["plain"].append(cpu_ms(lambda: head(x)))
            times["blocks"].append(cpu_ms(lambda: chunked(x)))
        out.append(summary("head", rows, times["plain"], times["blocks"], **{"bit-equal": equal}))
    return out


def decode_steps(model, tokenizer, repeats: int, quick: bool) -> list[dict]:
    from transformers import DynamicCache

    from lit_align.generation.decoder import MIN_SHARED_PREFIX, Decoder, prefill
    from lit_align.generation.linear import ChunkedHead

    ids, mask = prompts(tokenizer, quick)
    cache = DynamicCache(config=model.config)
    out, mask, positions, prefix = prefill(model, ids, mask.long(), cache, MIN_SHARED_PREFIX)
    decoder = Decoder(model, cache, mask, positions[:, -1:], prefix, steps=2 * repeats * 5 + 1)
    if not isinstance(decoder.model.get_output_embeddings(), ChunkedHead):
        raise SystemExit("the Decoder did not put ChunkedHead on this model (chunkable_head: not a plain float32 head)")
    heads = {"plain": model.get_output_embeddings(), "blocks": decoder.model.get_output_embeddings()}
    token, step, rows_out = out.logits[:, -1].argmax(-1), 0, []
    for rows in (32, 16, 8, 4, 2):
        decoder.keep(torch.arange(rows))
        token = token[:rows]
        times = {"plain": [], "blocks": []}
        for _ in range(repeats):
            for name, head in heads.items():
                decoder.model.set_output_embeddings(head)
                times[name].append(cpu_ms(lambda: decoder(token, step)))
                step += 1
        decoder.model.set_output_embeddings(heads["blocks"])
        rows_out.append(summary("decode step", rows, times["plain"], times["blocks"]))
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12, help="calls (head) or steps (decode) per variant and size")
    parser.add_argument("--quick", action="store_true", help="the tiny test model")
    a = parser.parse_args()
    torch.set_num_threads(1)
    name = "smollm2-135m-instruct"
    if a.quick:
        import tempfile
        from pathlib import Path

        import lit_align.generation.linear as linear
        from lit_align.testing import make_tiny_model

        name = str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
        linear.HEAD_CHUNK = 128  # the tiny vocabulary (~500) in several blocks
    model, tokenizer = load(name)
    info = harness.machine()
    with torch.no_grad():
        rows = head_alone(model, a.repeats) + decode_steps(model, tokenizer, a.repeats, a.quick)
    harness.report("sampler_head_quick" if a.quick else "sampler_head", {"machine": info, "args": vars(a), "rows": rows},
                   rows, list(rows[0]))


if __name__ == "__main__":
    main()
