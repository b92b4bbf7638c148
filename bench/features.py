"""Probe feature extraction: `lit_align.probes.features.extract_features` vs a plain HF forward loop.

    python -m bench.features                    # llama-1m and llama-30m, 128 HH-RLHF texts, all layers
    python -m bench.features --configs llama-30m --texts 256

Texts: the chosen side of real HH-RLHF pairs (prompt rendered with the chat template + response +
EOS, the last 256 tokens). `extract_features` sorts by length, batches 16, skips the LM head and
pools the last token of every layer. The baseline is what one writes without it: batches of 16 in
file order, a full `model(..., output_hidden_states=True)` forward (LM head included), then the
same pooling. Both alternate (A B A B) over --repeats passes; medians reported. TRL has no
feature extraction to compare with.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench import dpo, harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="llama-1m,llama-30m")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="64 texts, llama-1m, 2 repeats")
    a = parser.parse_args()
    if a.quick:
        a.texts, a.configs, a.repeats = 64, "llama-1m", 2
    torch.set_num_threads(a.threads)
    info = harness.machine()

    from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer
    from lit_align.probes.features import encode_texts, extract_features, select_features

    rows = harness.hh_rows(a.texts)
    results, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for config in a.configs.split(","):
            path = dpo.model_dir(config, Path(tmp))
            cfg = PolicyConfig(name_or_path=str(path))
            tokenizer, model = load_tokenizer(cfg), load_causal_lm(cfg).eval()
            ids = encode_texts(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows], max_length=a.max_length)
            layers = list(range(1, model.config.num_hidden_layers + 1))
            tokens = sum(len(x) for x in ids)

            @torch.no_grad()
            def plain():
                out = []
                for start in range(0, len(ids), 16):
                    chunk = ids[start : start + 16]
                    width = max(len(x) for x in chunk)
                    batch = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in chunk])
                    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
                    hs = model(input_ids=batch, attention_mask=mask, output_hidden_states=True).hidden_states
                    out.append(select_features(hs, mask, layers, "last"))
                return torch.cat(out)

            def ours():
                return extract_features(model, ids, layers, "last", 16, tokenizer.pad_token_id, progress=False)

            watch = harness.Stopwatch()
            ours(), plain()  # warm-up
            for _ in range(a.repeats):
                watch.time("extract_features", ours)
                watch.time("plain_forward", plain)
            same = torch.allclose(ours(), plain().float(), atol=1e-4, rtol=1e-4)
            r = {"config": config, "texts": len(ids), "tokens": tokens, "features_match": same}
            for side in ("extract_features", "plain_forward"):
                r[side] = {**watch.summary(side), "tokens_per_s": tokens / watch.summary(side)["median_s"]}
                table.append({"config": config, "method": side, "texts": len(ids), "tokens": tokens,
                              "median s": r[side]["median_s"], "tokens/s": r[side]["tokens_per_s"]})
            r["speedup"] = r["plain_forward"]["median_s"] / r["extract_features"]["median_s"]
            results.append(r)
    harness.report("features" + ("_quick" if a.quick else ""), {"machine": info, "args": vars(a), "results": results}, table, list(table[0]))


if __name__ == "__main__":
    main()
