"""Lean sampler throughput (lit_align.generation.lean) on SmolLM2-135M, against this machine's limits measured in the same run.

    python -m bench.sampler                        # SmolLM2-135M-Instruct, 32 one-shot CoD prompts, 96 new tokens
    python -m bench.sampler --quick                # the tiny test model, 1 repeat: seconds (CI)
    python -m bench.sampler --variants before,lean --repeats 5 --threads 2
    python -m bench.sampler --profile lean         # torch.profiler tables (prefill, decode loop) of one sampled run,
                                                   # saved as bench/results/sampler_profile_lean.json

Workload: the demo's CoD prompt (`cod_messages(p, one_shot=True)`, the chat template applied) for
the first 32 harmful prompts of refusal_direction/harmful_train.json, left-padded in one batch,
96 new tokens; configs `sample` (temperature 0.7, top-p 0.95, generator seed 0) and `greedy`.

Variants:
* before    the sampler's file as of HISTORY["before"] (read from git): DynamicCache grown by
            concatenation, every row computed to the end, top-p's full sort for the whole batch
            whenever one row's nucleus is not in its top 64; float32
* prealloc  as of HISTORY["prealloc"]: + KV cache in preallocated buffers, ended rows dropped from
            the forwards, top-p's wider search per row
* shared    as of HISTORY["shared"]: + the shared prompt prefix's keys/values kept once and read by
            shared-prefix attention
* lean      today's `sample_ids`, float32: + the LM head in column blocks (`ChunkedHead`; the ids of
            all four are compared)
* int8      today's `sample_ids` on `int8_for_generation(model)` (opt-in; ids differ, see the JSON)
* bf16      today's `sample_ids` on the model loaded in bfloat16 (`PolicyConfig(dtype="bfloat16")`)
* bf16copy  today's `sample_ids` on the float32 model's bfloat16 copy (`SamplingConfig(dtype="bfloat16")`:
            the copy made once, the float32 weights written into it at every call, as when training)

Timing: one warm-up round, then --repeats rounds; a round runs every (config, variant) once, so
load from other processes hits all alike. Per (config, variant): median wall seconds and median
CPU seconds of the process (with --threads 1 the CPU time hardly depends on other processes'
load, the wall time does), generated tokens (each row up to and including its EOS) per second.

Limits, measured in the same run (before and after the timings; best of each): float32 matmul
peak (2048³ GEMM) and memory bandwidth (256 MB tensor copy, bytes read + written / s), both as
wall and CPU rates. The decode step at the full batch of 32 rows (FlopCounterMode, one step
after the prompt) has F matmul FLOPs and reads W weight bytes, so generated tokens/s can not
exceed peak · 32 / F (compute) nor bandwidth · 32 / W (memory). The fractions printed are the
measured tokens/s over these ceilings (prefill included in the measured time, so they understate
the decode loop's own). Peak RSS: each variant once more in a fresh process (not with --quick,
or --no-rss; --rss-only: only these, into sampler_rss.json).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness

SAMPLER_AT_HISTORY = "lit_align/sampling.py"  # the lean sampler's file at these commits (since moved to generation/lean.py)
HISTORY = {  # variants that run the sampler's file as of a commit
    "before": "a771d31d57fe97e09f0f5fd70cb67aabe7bcdb70",  # the sampler this benchmark started from
    "prealloc": "44e95f7",  # + preallocated KV cache, ended rows dropped, top-p's wider search per row
    "shared": "2ae1ee8",  # + shared-prefix attention (it registers the same attention function as today's)
}
HARMFUL = harness.ROOT.parent / "shared" / "data" / "refusal_direction" / "harmful_train.json"
ROWS, NEW_TOKENS = 32, 96
CONFIGS = {"sample": dict(temperature=0.7, top_p=0.95), "greedy": dict(temperature=0.0)}
VARIANTS = ("before", "prealloc", "shared", "lean", "int8", "bf16", "bf16copy")


# ---------------------------------------------------------------------------- samplers and models
def module_at(variant: str):
    """The sampler's module as of HISTORY[variant], from `git show`, imported as a module of its own."""
    commit = HISTORY[variant]
    proc = subprocess.run(["git", "show", f"{commit}:{SAMPLER_AT_HISTORY}"], cwd=harness.ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"variant {variant!r} needs git history with commit {commit}: {proc.stderr.strip()} "
                         "(leave it out with --variants)")
    path = Path(tempfile.mkdtemp()) / f"sampling_{variant}.py"
    path.write_text(proc.stdout)
    spec = importlib.util.spec_from_file_location(f"sampling_{variant}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str, dtype: str = "float32"):
    from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer

    policy = PolicyConfig(name_or_path=name, dtype=dtype)
    return load_causal_lm(policy).eval(), load_tokenizer(policy)


def samplers(name: str, variants: list[str]) -> tuple[dict, object]:
    """{variant: (sample_ids function, model)} and the tokenizer. The float32 model is loaded only
    when a variant needs it; int8 quantises it in place when no other variant does (as a user would)."""
    from lit_align.generation import int8_for_generation, sample_ids

    models: dict = {}

    def float32():
        if "float32" not in models:
            models["float32"] = load(name)
        return models["float32"][0]

    out = {}
    for v in variants:
        if v in HISTORY:
            out[v] = (module_at(v).sample_ids, float32())
        elif v == "lean":
            out[v] = (sample_ids, float32())
        elif v == "int8":
            out[v] = (sample_ids, int8_for_generation(float32() if variants == ["int8"] else copy.deepcopy(float32())))
        elif v == "bf16":
            models["bfloat16"] = load(name, "bfloat16")
            out[v] = (sample_ids, models["bfloat16"][0])
        elif v == "bf16copy":
            out[v] = bf16_copy(float32())
    return out, next(iter(models.values()))[1]


def bf16_copy(model) -> tuple:
    """(sample_ids on `SamplingConfig(dtype="bfloat16")`'s copy of `model`, refreshed at every call; the copy)."""
    from dataclasses import replace

    from lit_align.generation import Generator, SamplingConfig, sample_ids

    holder = Generator()
    holder.model = model
    copied = holder.sampling_model(SamplingConfig(dtype="bfloat16"))

    def fn(_, ids, mask, sampling, *rest):
        return sample_ids(holder.sampling_model(replace(sampling, dtype="bfloat16")), ids, mask, sampling, *rest)

    return fn, copied


def prompts(tokenizer, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from lit_align.generation import LeanGenerator
    from lit_align.srmir.cod import cod_messages

    if not HARMFUL.exists():
        raise SystemExit(f"benchmark prompts not found: {HARMFUL} (see /work/shared/data/SOURCES.md)")
    harmful = [r["instruction"] for r in json.loads(HARMFUL.read_text())[:ROWS]]
    return LeanGenerator(None, tokenizer).encode_prompts([cod_messages(p, one_shot=True) for p in harmful])


def generated_tokens(ids: torch.Tensor, eos: int) -> int:
    """Tokens up to and including each row's first EOS (all of a row without one)."""
    is_eos = ids == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ids.shape[1])
    return int(first.sum())


# ---------------------------------------------------------------------------- limits
def limits(quick: bool) -> dict:
    """Matmul peak and copy bandwidth, wall and CPU rates, best of 5 each."""
    n, numel = (512, 2**22) if quick else (2048, 2**26)
    a, b = torch.randn(n, n), torch.randn(n, n)
    src, dst = torch.randn(numel), torch.empty(numel)
    out = {}
    for name, fn, work in (("matmul_flops", lambda: torch.mm(a, b), 2 * n**3), ("copy_bytes", lambda: dst.copy_(src), 8 * numel)):
        fn()
        wall, cpu = [], []
        for _ in range(5):
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        out[name + "_per_s_wall"] = work / min(wall)
        out[name + "_per_s_cpu"] = work / max(min(cpu), 1e-9)
    return out


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter and Int8Linear buffer, except an
    input embedding not shared with the LM head (a step reads only its rows' entries)."""
    from lit_align.generation import Int8Linear

    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(m.weight_t): m.weight_t for m in model.modules() if isinstance(m, Int8Linear)})
    embedding, head = model.get_input_embeddings().weight, getattr(model.get_output_embeddings(), "weight", None)
    if head is not embedding:
        tensors.pop(id(embedding), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_step_flops(model, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Matmul FLOPs (FlopCounterMode) of one decode step of all rows, right after the prompt."""
    from transformers import DynamicCache

    from lit_align.generation.decoder import MIN_SHARED_PREFIX, prefill
    from lit_align.models import kv_cache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out, mask, positions, _ = prefill(model, ids, mask.long(), cache, MIN_SHARED_PREFIX)
        token = out.logits[:, -1].argmax(-1)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        flops, _ = harness.flops_of(lambda: model(input_ids=token, attention_mask=mask, position_ids=positions[:, -1:] + 1,
                                                  **kv_cache(cache), use_cache=True))
    return flops


# ---------------------------------------------------------------------------- runs
def run_once(fn, model, ids, mask, config: str, tokenizer) -> torch.Tensor:
    from lit_align.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, **CONFIGS[config])
    generator = torch.Generator().manual_seed(0)
    return fn(model, ids, mask, sampling, 1, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)


def time_all(name: str, variants: list[str], repeats: int, quick: bool) -> dict:
    """Interleaved timings of every (config, variant), the limits and the ceilings."""
    from lit_align.srmir.cod import is_valid_cod

    found, tokenizer = samplers(name, variants)
    ids, mask = prompts(tokenizer, quick)
    lean_model = found.get("lean", found[variants[0]])[1]
    result = {"limits_before": limits(quick), "prompt_tokens": int(mask.sum()), "prompt_width": ids.shape[1]}
    result["decode_step_flops"] = decode_step_flops(lean_model, ids, mask)
    times, outputs = {}, {}
    for r in range(1 + repeats):  # round 0 is the warm-up
        for config in CONFIGS:
            for v in variants:
                fn, model = found[v]
                wall, cpu = time.perf_counter(), time.process_time()
                outputs[config, v] = run_once(fn, model, ids, mask, config, tokenizer)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if r:
                    times.setdefault((config, v), []).append((wall, cpu))
                print(f"round {r} {config:6s} {v:6s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  load {harness.os.getloadavg()[0]:.1f}", flush=True)
    result["limits_after"] = limits(quick)
    best = {k: max(result["limits_before"][k], result["limits_after"][k]) for k in result["limits_before"]}
    rows = []
    for (config, v), t in times.items():
        fn, model = found[v]
        ids_v = outputs[config, v]
        tokens = generated_tokens(ids_v, tokenizer.eos_token_id)
        row = {"config": config, "variant": v, "wall_s": statistics.median(w for w, _ in t), "cpu_s": statistics.median(c for _, c in t),
               "wall_s_all": [w for w, _ in t], "cpu_s_all": [c for _, c in t], "generated_tokens": tokens,
               "weight_bytes_per_step": weight_bytes(model)}
        for clock in ("wall", "cpu"):
            row[f"tokens_per_s_{clock}"] = tokens / row[f"{clock}_s"]
            row[f"compute_ceiling_{clock}"] = best[f"matmul_flops_per_s_{clock}"] * ROWS / result["decode_step_flops"]
            row[f"memory_ceiling_{clock}"] = best[f"copy_bytes_per_s_{clock}"] * ROWS / row["weight_bytes_per_step"]
        if ("before" in variants) and v != "before":
            before = outputs[config, "before"]
            row["same_ids_as_before"] = before.shape == ids_v.shape and bool(torch.equal(before, ids_v))
            row["rows_same_as_before"] = rows_equal(before, ids_v, tokenizer.eos_token_id)
        if v != "lean" and "lean" in variants:
            row["rows_same_as_lean"] = rows_equal(outputs[config, "lean"], ids_v, tokenizer.eos_token_id)
            row["first_difference_vs_lean"] = first_differences(outputs[config, "lean"], ids_v, tokenizer.eos_token_id)
        if v in ("int8", "bf16", "bf16copy") and "lean" in variants:
            row["vs_float32_along_lean_samples"] = divergence(found["lean"][1], model, ids, mask, outputs[config, "lean"], tokenizer.eos_token_id)
        row["valid_cod"] = sum(is_valid_cod(t) for t in tokenizer.batch_decode(ids_v, skip_special_tokens=True))
        rows.append(row)
    texts = {f"{config}/{v}": tokenizer.decode(out[0], skip_special_tokens=True) for (config, v), out in outputs.items()}
    return {**result, "best_limits": best, "runs": rows, "first_row_texts": texts}


def completions(ids: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row's tokens up to and including its first EOS."""
    rows = [row.tolist() for row in ids]
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def rows_equal(a: torch.Tensor, b: torch.Tensor, eos: int) -> int:
    return sum(x == y for x, y in zip(completions(a, eos), completions(b, eos)))


def first_differences(a: torch.Tensor, b: torch.Tensor, eos: int) -> list[int]:
    """Per row, the first position where the completions differ (-1: identical)."""
    out = []
    for x, y in zip(completions(a, eos), completions(b, eos)):
        out.append(-1 if x == y else next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))))
    return out


def divergence(reference, model, ids: torch.Tensor, mask: torch.Tensor, completions: torch.Tensor, eos: int) -> dict:
    """How far `model`'s next-token distributions are from `reference`'s along the reference's own
    completions (teacher forcing, each completion up to and including its EOS): mean KL(ref ‖ model)
    per token, and how often both put the same token first."""
    is_eos = completions == eos
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completions.shape[1])
    keep = torch.arange(completions.shape[1])[None] < length[:, None]
    full, full_mask = torch.cat([ids, completions], 1), torch.cat([mask, keep.long()], 1)
    kl, same, count = 0.0, 0, 0
    with torch.no_grad():
        for rows in torch.arange(len(ids)).split(4):  # 4 rows at a time: full-vocabulary logits are large
            keep_logits = completions.shape[1] + 1  # the positions that predict completion tokens, and the last one
            ref, new = (m(input_ids=full[rows], attention_mask=full_mask[rows], logits_to_keep=keep_logits).logits[:, :-1].float()
                        .log_softmax(-1) for m in (reference, model))
            k = keep[rows]
            kl += float((ref.exp() * (ref - new)).sum(-1)[k].sum())
            same += int((ref.argmax(-1) == new.argmax(-1))[k].sum())
            count += int(k.sum())
    return {"mean_kl_per_token": kl / count, "top1_agreement": same / count, "tokens": count}


def rss_worker(name: str, variant: str, quick: bool) -> dict:
    found, tokenizer = samplers(name, [variant])
    ids, mask = prompts(tokenizer, quick)
    fn, model = found[variant]
    run_once(fn, model, ids, mask, "sample", tokenizer)
    return {"variant": variant, "peak_rss_mb": harness.peak_rss_mb()}


def profile(name: str, variant: str, quick: bool) -> None:
    """torch.profiler tables of one sampled run: the prefill alone, then the rest (the decode loop)."""
    from torch.profiler import profile as torch_profile
    from transformers import DynamicCache

    from lit_align.generation.decoder import MIN_SHARED_PREFIX, prefill

    found, tokenizer = samplers(name, [variant])
    ids, mask = prompts(tokenizer, quick)
    fn, model = found[variant]
    run_once(fn, model, ids, mask, "sample", tokenizer)  # warm-up
    with torch.no_grad():
        cpu = time.process_time()
        prefill(model, ids, mask.long(), DynamicCache(config=model.config), MIN_SHARED_PREFIX)
        prefill_cpu = time.process_time() - cpu
    cpu = time.process_time()
    run_once(fn, model, ids, mask, "sample", tokenizer)
    unprofiled = {"prefill_cpu_s": prefill_cpu, "whole_run_cpu_s": time.process_time() - cpu}
    print(f"unprofiled CPU seconds: prefill {prefill_cpu:.2f}, whole run {unprofiled['whole_run_cpu_s']:.2f}")
    with torch_profile() as pre, torch.no_grad():
        prefill(model, ids, mask.long(), DynamicCache(config=model.config), MIN_SHARED_PREFIX)
    with torch_profile() as whole:
        run_once(fn, model, ids, mask, "sample", tokenizer)
    prefill_us = {e.key: e.self_cpu_time_total for e in pre.key_averages()}
    decode = [(e.self_cpu_time_total - prefill_us.get(e.key, 0), e.key, e.count) for e in whole.key_averages()]
    total, prefill_total = sum(d for d, _, _ in decode), sum(prefill_us.values())
    print(f"prefill: {prefill_total / 1e6:.2f} s self CPU; decode loop: {total / 1e6:.2f} s")
    rows = [{"op": key, "decode self CPU s": us / 1e6, "% of decode": 100 * us / total, "calls (whole run)": count}
            for us, key, count in sorted(decode, reverse=True)[:25]]
    harness.report(f"sampler_profile_{variant}" + ("_quick" if quick else ""),
                   {"variant": variant, "unprofiled": unprofiled, "prefill_self_cpu_s": prefill_total / 1e6,
                    "decode_self_cpu_s": total / 1e6, "top_decode_ops": rows}, rows, list(rows[0]))


def main() -> None:
    global NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens generated per row (the workload's 96)")
    parser.add_argument("--quick", action="store_true", help="the tiny test model, 1 repeat, no RSS runs")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS run of each variant")
    parser.add_argument("--rss-only", action="store_true", help="only the peak-RSS runs (bench/results/sampler_rss.json)")
    parser.add_argument("--profile", choices=VARIANTS, help="print torch.profiler tables for this variant and stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    a = parser.parse_args()
    variants = a.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    if a.rss_only and a.no_rss:
        parser.error("--rss-only and --no-rss: choose one")
    torch.set_num_threads(a.threads)
    NEW_TOKENS = a.new_tokens
    if a.worker:
        return harness.print_result(rss_worker(a.model, a.worker, a.quick))
    with tempfile.TemporaryDirectory() as tmp:
        name = "smollm2-135m-instruct"
        if a.quick:
            from lit_align.testing import make_tiny_model

            name, a.repeats, a.no_rss = str(make_tiny_model(Path(tmp) / "tiny")), 1, not a.rss_only
        if a.profile:
            return profile(name, a.profile, a.quick)
        info = harness.machine()
        # Before this process loads a model: a forked child's peak RSS starts at its parent's size.
        rss = {} if a.no_rss else {v: harness.run_isolated("bench.sampler", ["--worker", v, "--model", name, "--threads", str(a.threads), "--new-tokens", str(a.new_tokens)])["peak_rss_mb"]
                                   for v in variants}
        if a.rss_only:
            rows = [{"variant": v, "peak RSS MB": mb} for v, mb in rss.items()]
            return harness.report("sampler_rss_quick" if a.quick else "sampler_rss", {"machine": info, "args": vars(a), "peak_rss_mb": rss}, rows, list(rows[0]))
        result = time_all(name, variants, a.repeats, a.quick)
        for row in result["runs"]:
            row["peak_rss_mb"] = rss.get(row["variant"])
    table = []
    for row in result["runs"]:
        before = next((r for r in result["runs"] if r["config"] == row["config"] and r["variant"] == "before"), None)
        table.append({
            "config": row["config"], "variant": row["variant"], "wall s": row["wall_s"], "CPU s": row["cpu_s"],
            "tokens": row["generated_tokens"], "tok/s wall": row["tokens_per_s_wall"], "tok/s CPU": row["tokens_per_s_cpu"],
            "× before (wall)": before and before["wall_s"] / row["wall_s"], "× before (CPU)": before and before["cpu_s"] / row["cpu_s"],
            "rows = before": row.get("rows_same_as_before"), "rows = lean": row.get("rows_same_as_lean"), "valid CoD": row["valid_cod"],
            "KL/token vs fp32": row.get("vs_float32_along_lean_samples", {}).get("mean_kl_per_token"),
            "% compute ceiling (CPU)": 100 * row["tokens_per_s_cpu"] / row["compute_ceiling_cpu"],
            "% memory ceiling (CPU)": 100 * row["tokens_per_s_cpu"] / row["memory_ceiling_cpu"],
            "peak RSS MB": row.get("peak_rss_mb"),
        })
    name = ("sampler_quick" if a.quick else "sampler") + ("" if a.new_tokens == parser.get_default("new_tokens") else f"_{a.new_tokens}tokens")
    harness.report(name, {"machine": info, "args": vars(a), **result}, table, list(table[0]))


if __name__ == "__main__":
    main()
