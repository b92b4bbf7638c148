"""Re-ranking cost (paper A): probe scoring + re-ranker vs a DPO step, and vs online sampling.

    python -m bench.rerank                       # llama-1m, 10 steps, 8 samples x 256 tokens, 5 sampling runs
    python -m bench.rerank --config llama-30m
    python -m bench.rerank --quick               # 5 steps, 64 new tokens, 2 sampling runs (a smoke run)

Per batch of 8 real HH-RLHF pairs (the same batches as bench.dpo):
* DPO step: `DPOModule.compute_loss` + backward + AdamW step of a module *with* a HybridProbe on
  every layer (its forward returns the hidden states the probe reads).
* Re-ranking overhead: `score_pairs(hidden_states)` (feature selection + HybridProbe) and the
  ConfidenceReRanker's decision, on that forward's own hidden states. Timed alone, interleaved
  with the steps; reported as a fraction of the DPO step median.
* Online sampling (what re-ranking replaces): for the batch's 8 prompts, 8 samples of 256 new
  tokens each with the package's fastest sampler (`lit_align.generation.LeanGenerator`: each
  prompt prefilled once, KV cache, temperature 1) plus scoring the 64 samples with a model of
  the policy's size (the policy's forward with hidden states + the probe, standing in for a
  reward model).
The sampling phase warms up (`--sampling-warmup` untimed runs of both), then alternates one
online-sampling run and one re-ranking run on the same batch, `--sampling-repeats` times (>= 5
by default), so that machine load hits both alike; the cost ratio is the median online time over
the median re-ranking time of that phase (the median of the per-run ratios is in the JSON too).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from pathlib import Path

import torch

from bench import dpo, harness


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1m", choices=[c for c in dpo.CONFIGS])
    parser.add_argument("--steps", type=int, help="timed DPO steps (default 10; --quick 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="online samples per prompt")
    parser.add_argument("--new-tokens", type=int, help="tokens per online sample (default 256; --quick 64)")
    parser.add_argument("--sampling-repeats", type=int, help="timed online-sampling runs (default 5; --quick 2)")
    parser.add_argument("--sampling-warmup", type=int, default=1, help="untimed online-sampling runs first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    defaults = {"steps": 5, "new_tokens": 64, "sampling_repeats": 2} if a.quick else {"steps": 10, "new_tokens": 256, "sampling_repeats": 5}
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def build(a, work: Path):
    """A DPOModule with a HybridProbe on every layer, its optimizer, and the collated batches."""
    from transformers import AutoConfig

    from lit_align.models import LoraArgs, PolicyConfig
    from lit_align.modules.dpo import DPOModule
    from lit_align.probes import HybridProbe

    path = dpo.model_dir(a.config, work)
    _, data, _ = dpo.lit_side(a.config, path, a.warmup + a.steps)  # for its AlignDataModule
    cfg = AutoConfig.from_pretrained(path)
    probe_path = HybridProbe(cfg.hidden_size, list(range(1, cfg.num_hidden_layers + 1))).save(work / "probe.safetensors")
    lora = LoraArgs(**dpo.LORA) if a.config == "smollm2-lora" else None
    module = DPOModule(
        PolicyConfig(name_or_path=str(path), lora=lora),
        reference="lora_base" if lora else "copy",
        probe_path=str(probe_path),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0),
    )
    module.configure_model()
    optimizer = module.configure_optimizers()
    data.tokenizer = module.tokenizer
    data.setup("fit")
    collate = data.collator()
    batches = [collate(data.train_set[i * dpo.BATCH : (i + 1) * dpo.BATCH]) for i in range(a.warmup + a.steps)]
    return module, optimizer, batches


def rerank_of(module, reranker, batch):
    """The re-ranking of `batch` (probe scores + decision), as a closure on that step's own hidden states."""
    input_ids, attention_mask, completion_mask = module.concatenated(batch)
    with torch.no_grad():  # a forward as the step's own, to get its hidden states
        _, hidden = module.sequence_logps(module.policy, input_ids, attention_mask, completion_mask, True)

    def rerank():
        s_c, s_r = module.score_pairs(hidden, attention_mask)
        reranker(dict(batch), s_c.detach(), s_r.detach())

    return rerank


def online_of(module, a, generated_tokens: list):
    """Online sampling of a batch's prompts (LeanGenerator) and scoring every sample with a policy-sized model."""
    from lit_align.generation import LeanGenerator, SamplingConfig
    from lit_align.probes.features import select_features

    generator = LeanGenerator(module.policy, module.tokenizer)
    sampling = SamplingConfig(max_new_tokens=a.new_tokens, temperature=1.0)

    def online(batch, seed):
        ids, mask = generator.encode_prompts(batch["prompt"])
        out = generator.generate_ids(ids, mask, sampling, a.samples, seed)
        generated_tokens.append(int(out.completion_mask.sum()))
        full = torch.cat([out.prompt_ids, out.completion_ids], 1)
        full_mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
        with torch.no_grad():
            for start in range(0, full.shape[0], 16):  # score like a reward model, 16 sequences at a time
                rows = slice(start, start + 16)
                hs = module.policy(input_ids=full[rows], attention_mask=full_mask[rows], output_hidden_states=True).hidden_states
                module.probe(select_features(hs, full_mask[rows], module.probe.layers, module.probe.pooling))

    return online


def measure(a, work: Path) -> tuple[harness.Stopwatch, list]:
    from lit_align.probes import ConfidenceReRanker

    module, optimizer, batches = build(a, work)
    reranker = ConfidenceReRanker(action="soft", granularity="batch")
    watch, generated_tokens = harness.Stopwatch(), []

    def dpo_step(batch):
        loss, _ = module.compute_loss(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i, batch in enumerate(batches):
        record = i >= a.warmup
        watch.time("dpo_step", lambda: dpo_step(batch), record=record)
        watch.time("rerank", rerank_of(module, reranker, batch), record=record)
    online = online_of(module, a, generated_tokens)
    # warm both, then alternate: online sampling of a batch, re-ranking of the same batch
    for r in range(a.sampling_warmup + a.sampling_repeats):
        record = r >= a.sampling_warmup
        batch = batches[a.warmup + r % a.steps]
        watch.time("online_sampling", lambda: online(batch, seed=r), record=record)
        watch.time("rerank_interleaved", rerank_of(module, reranker, batch), record=record)
    return watch, generated_tokens[a.sampling_warmup :]


def summarise(a, watch: harness.Stopwatch, generated_tokens: list) -> tuple[dict, list[dict]]:
    step, rr, on = (watch.summary(k) for k in ("dpo_step", "rerank", "online_sampling"))
    rr_paired = watch.summary("rerank_interleaved")
    per_run = [o / r for o, r in zip(watch.times["online_sampling"], watch.times["rerank_interleaved"])]
    result = {
        "config": a.config,
        "args": vars(a),
        "sampler": "lit_align.generation.LeanGenerator",
        "dpo_step_with_probe": step,
        "rerank_overhead": rr,
        "online_sampling": on,
        "rerank_interleaved_with_sampling": rr_paired,
        "generated_tokens_per_batch": statistics.median(generated_tokens),
        "generated_tokens_expected": dpo.BATCH * a.samples * a.new_tokens,
        "rerank_fraction_of_dpo_step": rr["median_s"] / step["median_s"],
        "online_over_rerank": on["median_s"] / rr_paired["median_s"],
        "online_over_rerank_per_run_median": statistics.median(per_run),
        "online_over_dpo_step": on["median_s"] / step["median_s"],
    }
    rows = [
        {"what": "DPO step (with probe)", "median s": step["median_s"], "n": step["n"]},
        {"what": "re-ranking (probe + re-ranker)", "median s": rr["median_s"], "n": rr["n"], "vs DPO step": result["rerank_fraction_of_dpo_step"]},
        {"what": "re-ranking, interleaved with the sampling runs", "median s": rr_paired["median_s"], "n": rr_paired["n"], "vs re-ranking": 1.0},
        {
            "what": f"online (LeanGenerator): {a.samples} x {a.new_tokens} tokens x {dpo.BATCH} prompts + scoring",
            "median s": on["median_s"],
            "n": on["n"],
            "vs DPO step": result["online_over_dpo_step"],
            "vs re-ranking": result["online_over_rerank"],
        },
    ]
    return result, rows


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    info = harness.machine()
    with tempfile.TemporaryDirectory() as tmp:
        watch, generated_tokens = measure(a, Path(tmp))
    result, rows = summarise(a, watch, generated_tokens)
    name = f"rerank_{a.config}" + ("_quick" if a.quick else "")
    harness.report(name, {"machine": info, **result}, rows, ["what", "median s", "n", "vs DPO step", "vs re-ranking"])
    print(f"\nonline sampling / re-ranking: {result['online_over_rerank']:,.0f}x "
          f"(medians of {rows[-1]['n']} interleaved runs each, load {info['loadavg_start'][0]:.1f})")


if __name__ == "__main__":
    main()
