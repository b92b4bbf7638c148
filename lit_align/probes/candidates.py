"""Candidate re-ranking (paper A, stage 2): k responses per prompt -> preference pairs.

Sample k candidates per prompt once from the policy (or read them from a `candidates`
column), score every (prompt, candidate) with the probe on the policy's own hidden states,
and keep the best as chosen and the worst as rejected (top-k / bottom-k for k pairs).

    lit-align rerank-candidates --data prompts.jsonl --probe probe.safetensors \
        --policy.name_or_path smollm2-135m-instruct --output pairs.jsonl --num_candidates 4
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from lit_align.data.formats import Format
from lit_align.generation import SamplingConfig
from lit_align.models import PolicyConfig
from lit_align.probes.features import encode_texts, extract_features
from lit_align.probes.probe import Probe

log = logging.getLogger(__name__)


class ProbeScorer:
    """The probe as a reward source: `scorer(prompts, completions, **columns) -> list[float]`.

    Scores are probe logits on the backbone's hidden states for the chat-templated prompt +
    completion + EOS (the same text DPO's forward sees)."""

    def __init__(self, model, tokenizer, probe: Probe, batch_size: int = 16, max_length: Optional[int] = None, progress: bool = True):
        self.model, self.tokenizer, self.probe = model, tokenizer, probe.eval()
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress

    @classmethod
    def from_files(cls, policy: PolicyConfig, probe_path: str | Path, **kwargs) -> "ProbeScorer":
        from lit_align.models import load_causal_lm, load_tokenizer
        from lit_align.probes.probe import load_probe

        model = load_causal_lm(policy).eval().requires_grad_(False)
        probe = load_probe(probe_path, expected_hidden_size=model.config.hidden_size, expected_num_layers=model.config.num_hidden_layers)
        return cls(model, load_tokenizer(policy), probe, **kwargs)

    @torch.no_grad()
    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
        ids = encode_texts(self.tokenizer, prompts, completions, self.max_length)
        features = extract_features(
            self.model, ids, self.probe.layers, self.probe.pooling, self.batch_size,
            self.tokenizer.pad_token_id, self.progress, desc="probe scores",
        )
        device = self.probe.feature_mean.device
        return self.probe(features.to(device)).cpu().tolist()


def select_pairs(scores: Sequence[float], pairs: int = 1) -> list[tuple[int, int]]:
    """(chosen, rejected) candidate indices: the i-th best with the i-th worst, i < `pairs`."""
    if 2 * pairs > len(scores):
        raise ValueError(f"{pairs} pair(s) per prompt need at least {2 * pairs} candidates, got {len(scores)}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [(order[i], order[-1 - i]) for i in range(pairs)]


def build_pairs(
    rows: list[dict], candidates: list[list[str]], scores: list[list[float]], pairs: int = 1, min_margin: float = 0.0
) -> tuple[list[dict], dict]:
    """Preference rows and counts of what was skipped (identical texts, margins ≤ `min_margin`)."""
    out, skipped = [], {"identical": 0, "small_margin": 0}
    for row, texts, s in zip(rows, candidates, scores):
        for c, r in select_pairs(s, pairs):
            if texts[c].strip() == texts[r].strip():
                skipped["identical"] += 1
            elif s[c] - s[r] <= min_margin:
                skipped["small_margin"] += 1
            else:
                out.append({
                    "prompt": row["prompt"], "chosen": texts[c], "rejected": texts[r],
                    "chosen_score": s[c], "rejected_score": s[r], "category": row.get("category"),
                })
    return out, skipped


def _candidates_of(rows: list[dict], column: str, need: int, source: str, on_bad_rows: str) -> tuple[list[dict], list[list[str]]]:
    from lit_align.data.formats import BadRowError

    kept, texts = [], []
    for index, row in enumerate(rows):
        value = row.get(column)
        problem = None
        if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
            problem = "expected a list of non-empty strings"
        elif len(value) < need:
            problem = f"has {len(value)} candidates, fewer than the {need} needed"
        if problem is None:
            kept.append(row)
            texts.append(list(value))
        elif on_bad_rows == "error":
            raise BadRowError(source, index, column, problem)
    if len(kept) < len(rows):
        log.warning("%s: skipped %d rows with unusable %r (on_bad_rows=skip)", source, len(rows) - len(kept), column)
    return kept, texts


def _sample_candidates(
    scorer: ProbeScorer, rows: list[dict], num_candidates: int, pairs_per_prompt: int, sampling: Optional[SamplingConfig],
    generation_batch_size: int, seed: int,
) -> list[list[str]]:
    """`num_candidates` responses per prompt, sampled once from the scorer's model (the policy)."""
    from lit_align.generation import LeanGenerator

    if num_candidates < 2 * pairs_per_prompt:
        raise ValueError(f"num_candidates={num_candidates} is fewer than the {2 * pairs_per_prompt} that pairs_per_prompt={pairs_per_prompt} needs")
    generator = LeanGenerator(scorer.model, scorer.tokenizer)
    texts = generator.generate(
        [r["prompt"] for r in rows], sampling or SamplingConfig(), num_candidates, generation_batch_size, seed
    )
    return [texts[i * num_candidates : (i + 1) * num_candidates] for i in range(len(rows))]


def _score_candidates(scorer: ProbeScorer, rows: list[dict], candidates: list[list[str]]) -> list[list[float]]:
    """The probe score of every (prompt, candidate), scored in one flat pass and regrouped per prompt."""
    flat_prompts = [r["prompt"] for r, c in zip(rows, candidates) for _ in c]
    flat_scores = scorer(flat_prompts, [t for c in candidates for t in c])
    scores, start = [], 0
    for c in candidates:
        scores.append(flat_scores[start : start + len(c)])
        start += len(c)
    return scores


def rerank_candidates(
    data: str,
    probe: str,
    policy: PolicyConfig,
    output: str,
    format: Format = "generic",
    candidates_column: str = "candidates",
    num_candidates: int = 4,
    sampling: Optional[SamplingConfig] = None,
    pairs_per_prompt: int = 1,
    min_margin: float = 0.0,
    batch_size: int = 16,
    generation_batch_size: int = 8,
    max_length: Optional[int] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    on_bad_rows: Literal["error", "skip"] = "error",
) -> dict:
    """Write a preference JSONL chosen/rejected by probe score among k candidates per prompt.

    Args:
        data: Prompts file or hub id; a `candidates` column (list of responses) is used if present,
            otherwise `num_candidates` responses per prompt are sampled once from `policy`.
        probe: A probe file trained on `policy`'s hidden states (lit-align fit -c configs/probe.yaml).
        policy: The model that samples candidates and whose hidden states the probe reads.
        output: The preference JSONL to write (prompt, chosen, rejected, chosen_score, rejected_score, category).
        format: Column preset of `data` (generic, hh_rlhf, pku_saferlhf).
        candidates_column: Column holding the candidate responses.
        num_candidates: Candidates sampled per prompt when `data` has none.
        sampling: How candidates are sampled (temperature, max_new_tokens, ...).
        pairs_per_prompt: k pairs per prompt: the i-th best against the i-th worst (needs 2k candidates).
        min_margin: Skip pairs whose score difference is not above this (ties carry no preference).
        batch_size: Texts per forward while scoring.
        generation_batch_size: Prompts per generate call.
        max_length: Keep only the last tokens of longer texts when scoring.
        limit: Use only the first `limit` prompts.
        seed: Sampling seed.
        on_bad_rows: "error" or "skip" rows with unusable candidates (skips are counted and logged).
    """
    from lit_align.data.formats import load_rows

    rows = load_rows(data, format, mode="prompts", on_bad_rows=on_bad_rows)[:limit]
    scorer = ProbeScorer.from_files(policy, probe, batch_size=batch_size, max_length=max_length)
    if candidates_column in rows[0]:
        rows, candidates = _candidates_of(rows, candidates_column, 2 * pairs_per_prompt, data, on_bad_rows)
    else:
        candidates = _sample_candidates(scorer, rows, num_candidates, pairs_per_prompt, sampling, generation_batch_size, seed)
    scores = _score_candidates(scorer, rows, candidates)
    pairs, skipped = build_pairs(rows, candidates, scores, pairs_per_prompt, min_margin)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    summary = {"prompts": len(rows), "candidates": sum(map(len, candidates)), "pairs": len(pairs), "skipped": skipped, "output": str(out)}
    log.info("rerank-candidates: %s", summary)
    print(json.dumps(summary))
    return summary


__all__ = ["ProbeScorer", "build_pairs", "rerank_candidates", "select_pairs"]
