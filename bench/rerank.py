"""Re-ranking cost (paper A): probe scoring + re-ranker vs a DPO step, and vs online sampling.

    python -m bench.rerank                       # llama-1m, 10 steps, 8 samples x 256 tokens
    python -m bench.rerank --config llama-30m --sampling-repeats 1
    python -m bench.rerank --quick               # 64 new tokens, 5 steps (ratios then scaled, see JSON)

Per batch of 8 real HH-RLHF pairs (the same batches as bench.dpo):
* DPO step: `DPOModule.compute_loss` + backward + AdamW step of a module *with* a HybridProbe on
  every layer (its forward returns the hidden states the probe reads).
* Re-ranking overhead: `score_pairs(hidden_states)` (feature selection + HybridProbe) and the
  ConfidenceReRanker's decision, on that forward's own hidden states. Timed alone, interleaved
  with the steps; reported as a fraction of the DPO step median.
* Online sampling (what re-ranking replaces): for the batch's 8 prompts, 8 samples of 256 new
  tokens each (`HFGenerator`, KV cache, temperature 1) plus scoring the 64 samples with a model of
  the policy's size (the policy's forward with hidden states + the probe, standing in for a reward
  model). The cost ratio is online time / re-ranking overhead time, per batch.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from pathlib import Path

import torch

from bench import dpo, harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-1m", choices=[c for c in dpo.CONFIGS])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="online samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens per online sample")
    parser.add_argument("--sampling-repeats", type=int, default=2, help="batches of online sampling timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    if a.quick:
        a.steps, a.new_tokens, a.sampling_repeats = 5, 64, 1
    torch.set_num_threads(a.threads)
    info = harness.machine()

    from lit_align.generation import HFGenerator, SamplingConfig
    from lit_align.models import LoraArgs, PolicyConfig
    from lit_align.modules.dpo import DPOModule
    from lit_align.probes import ConfidenceReRanker, HybridProbe

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = dpo.model_dir(a.config, work)
        module, data, _ = dpo.lit_side(a.config, path, a.warmup + a.steps)  # for its AlignDataModule
        from transformers import AutoConfig

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
        reranker = ConfidenceReRanker(action="soft", granularity="batch")
        collate = data.collator()
        batches = [collate(data.train_set[i * dpo.BATCH : (i + 1) * dpo.BATCH]) for i in range(a.warmup + a.steps)]
        watch = harness.Stopwatch()

        def dpo_step(batch):
            loss, _ = module.compute_loss(batch, "train")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for i, batch in enumerate(batches):
            record = i >= a.warmup
            watch.time("dpo_step", lambda: dpo_step(batch), record=record)
            input_ids, attention_mask, completion_mask = module.concatenated(batch)
            with torch.no_grad():  # a forward as the step's own, to get its hidden states
                _, hidden = module.sequence_logps(module.policy, input_ids, attention_mask, completion_mask, True)

            def rerank():
                s_c, s_r = module.score_pairs(hidden, attention_mask)
                reranker(dict(batch), s_c.detach(), s_r.detach())

            watch.time("rerank", rerank, record=record)

        # online sampling: 8 samples x new_tokens for the batch's prompts, then score all samples
        generator = HFGenerator(module.policy, module.tokenizer)
        sampling = SamplingConfig(max_new_tokens=a.new_tokens, temperature=1.0)
        generated_tokens = []

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
                    from lit_align.probes.features import select_features

                    module.probe(select_features(hs, full_mask[rows], module.probe.layers, module.probe.pooling))

        for r in range(a.sampling_repeats):
            watch.time("online_sampling", lambda: online(batches[a.warmup + r], seed=r))

    step, rr, on = (watch.summary(k) for k in ("dpo_step", "rerank", "online_sampling"))
    expected = dpo.BATCH * a.samples * a.new_tokens
    result = {
        "config": a.config,
        "args": vars(a),
        "dpo_step_with_probe": step,
        "rerank_overhead": rr,
        "online_sampling": on,
        "generated_tokens_per_batch": statistics.median(generated_tokens),
        "generated_tokens_expected": expected,
        "rerank_fraction_of_dpo_step": rr["median_s"] / step["median_s"],
        "online_over_rerank": on["median_s"] / rr["median_s"],
        "online_over_dpo_step": on["median_s"] / step["median_s"],
    }
    rows = [
        {"what": "DPO step (with probe)", "median s": step["median_s"], "n": step["n"]},
        {"what": "re-ranking (probe + re-ranker)", "median s": rr["median_s"], "n": rr["n"], "vs DPO step": result["rerank_fraction_of_dpo_step"]},
        {
            "what": f"online: {a.samples} x {a.new_tokens} tokens x {dpo.BATCH} prompts + scoring",
            "median s": on["median_s"],
            "n": on["n"],
            "vs DPO step": result["online_over_dpo_step"],
            "vs re-ranking": result["online_over_rerank"],
        },
    ]
    harness.report(f"rerank_{a.config}" + ("_quick" if a.quick else ""), {"machine": info, **result}, rows, ["what", "median s", "n", "vs DPO step", "vs re-ranking"])


if __name__ == "__main__":
    main()
