"""Is a `torch.compile`d decode step faster than lit_align's eager one? (It was not here: docs/benchmarks.md.)

    python -m bench.sampler_compile                      # SmolLM2-135M cut to 4 layers, 16 rows, 1 thread
    python -m bench.sampler_compile --layers 30 --mode max-autotune-no-cudagraphs

Random prompts (16 rows × 200 tokens) on SmolLM2-135M-Instruct cut to --layers layers (compile time
grows with them), then --steps greedy decode steps three ways, in this order:
* eager      `sample_ids`' Decoder (preallocated cache, the LM head in blocks)
* static     the model's forward over transformers' StaticCache (one buffer of prompt + steps
             positions, attention over all of it with a key mask): the shapes a compiled step needs
* compiled   the same step through `torch.compile(dynamic=False, mode=--mode)`; its first call
             (the compilation) is timed apart
Per-step CPU medians (steps after the first two), the compile's wall and CPU seconds (inductor also
compiles in worker processes, whose CPU is not counted), and how far the logits are from eager's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import harness
from bench.sampler import load


def run(step, steps: int) -> tuple[list[torch.Tensor], list[float]]:
    logits, times = [], []
    for t in range(steps):
        start = time.process_time()
        logits.append(step(t).clone())
        times.append(time.process_time() - start)
    return logits, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    a = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import DynamicCache, StaticCache

    from lit_align.models import kv_cache
    from lit_align.generation.decoder import Decoder

    model, _ = load("smollm2-135m-instruct")
    model.model.layers = model.model.layers[: a.layers]
    model.config.num_hidden_layers = a.layers
    width = 200
    ids = torch.randint(0, model.config.vocab_size, (a.rows, width), generator=torch.Generator().manual_seed(0))
    mask, positions = torch.ones_like(ids), torch.arange(width).expand(a.rows, width)
    prompt = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    token = torch.zeros(a.rows, dtype=torch.long)  # the same token every step: a speed test

    def eager():
        cache = DynamicCache(config=model.config)
        model(**prompt, **kv_cache(cache))
        decoder = Decoder(model, cache, mask, positions[:, -1:], 0, a.steps)
        return run(lambda t: decoder(token, t), a.steps)

    def forward(tok, position, keys, cache):
        return model(input_ids=tok[:, None], attention_mask=keys, position_ids=position, **kv_cache(cache), use_cache=True).logits[:, -1].float()

    def static(step_fn):
        cache = StaticCache(config=model.config, max_cache_len=width + a.steps)
        model(**prompt, **kv_cache(cache))
        keys = torch.zeros(a.rows, 1, 1, width + a.steps, dtype=torch.bool)
        keys[..., :width] = True

        def step(t):
            keys[..., width + t] = True
            return step_fn(token, positions[:, -1:] + 1 + t, keys, cache)

        return run(step, a.steps)

    compiled = torch.compile(forward, dynamic=False, **({} if a.mode == "default" else {"mode": a.mode}))
    result = {"args": vars(a)}
    with torch.no_grad():
        eager()  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        static(compiled)  # compiles at its first step
        result["first_compiled_run_wall_s"], result["first_compiled_run_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
        found = {"eager": eager(), "static": static(forward), "compiled": static(compiled)}
    reference = found["eager"][0]
    rows = [{"variant": name, "ms per step (median)": 1e3 * statistics.median(times[2:]),
             "max |logit - eager's|": max(float((x - y).abs().max()) for x, y in zip(reference, logits)),
             "argmax = eager's": all(torch.equal(x.argmax(-1), y.argmax(-1)) for x, y in zip(reference, logits))}
            for name, (logits, times) in found.items()]
    harness.report(f"sampler_compile_{a.layers}layers", {"machine": harness.machine(), **result, "runs": rows}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
