"""OnlineDPOModule: DPO on pairs the policy samples itself, picked by the probe (paper A's costly baseline).

Each training step, for the batch's B prompts x (AlignDataModule in `prompts` mode):

    y_1..y_k  ~ π_θ(· | x)                          # k candidates per prompt from the current weights (LeanGenerator, seeded)
    s_j       = probe(h_θ(x ⊕ y_j))                 # the policy's own hidden states, read as DPO's probe reads them
    y_w, y_l  = y_argmax_j s_j, y_argmin_j s_j      # the best is chosen, the worst rejected
    loss      = DPOModule's loss on (x, y_w, y_l)   # the same loss, reference and optimiser as off-policy DPO

A prompt is sampled anew every time the loader reaches it, so once per epoch, and always by the
weights the step is about to update: no pair is older than the step that trains on it, and when a
step budget ends mid-epoch no prompt was sampled for nothing. Pairs whose best and worst
candidates have the same text, or scores within `min_margin`, carry no preference and are left
out (counted). The sampled tokens are counted in `generated_tokens` (kept in checkpoints).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from lit_align.checks import ConfigError
from lit_align.data.collate import Collator
from lit_align.data.rerank import ReRanker
from lit_align.generation import SamplingConfig
from lit_align.models import PolicyConfig
from lit_align.modules.dpo import DPOModule

log = logging.getLogger(__name__)

torch.serialization.add_safe_globals([SamplingConfig])  # a hyper-parameter: checkpoints load with weights_only


def pick_pairs(
    prompt_ids: list[list[int]], candidates: list[list[int]], scores: Tensor, min_margin: float = 0.0
) -> tuple[list[tuple[int, int, int]], dict]:
    """(prompt, chosen, rejected) indices: per prompt i, the candidates (flat index i·k + j) with
    the highest and the lowest score; and counts of the prompts left out.

    `scores` is [B, k]; `candidates` holds the B·k completions prompt-major. A pair is left out
    when s_w − s_l ≤ `min_margin` (`small_margin`, e.g. every candidate scored alike) or its two
    texts are identical (`identical`)."""
    num_prompts, k = scores.shape
    if len(prompt_ids) != num_prompts or len(candidates) != num_prompts * k:
        raise ValueError(f"pick_pairs: {len(prompt_ids)} prompts and {len(candidates)} candidates for scores of shape {tuple(scores.shape)}")
    best, worst = scores.argmax(1).tolist(), scores.argmin(1).tolist()
    picked, left_out = [], {"identical": 0, "small_margin": 0}
    for i, (w, l) in enumerate(zip(best, worst)):
        if w == l or float(scores[i, w] - scores[i, l]) <= min_margin:
            left_out["small_margin"] += 1
        elif candidates[i * k + w] == candidates[i * k + l]:
            left_out["identical"] += 1
        else:
            picked.append((i, i * k + w, i * k + l))
    return picked, left_out


class OnlineDPOModule(DPOModule):
    """DPO on probe-picked pairs sampled from the current policy every step (see the module docstring).

    Train on an AlignDataModule in `prompts` mode (`data.path` may be a preference file: its
    prompts are used). Every other argument is DPOModule's (loss_type, beta, sft_weight, reference,
    optimizer, export_dir, ...); the probe here picks pairs, so there is no re-ranker and no
    co-trained probe.

    Args:
        policy: The model to train; it also samples the candidates.
        probe_path: A probe trained on this policy's hidden states (lit-align fit -c configs/probe.yaml);
            it scores each candidate on the policy's own hidden states.
        num_candidates: k answers sampled per prompt (the best and the worst make the pair).
        sampling: How candidates are sampled (default: temperature 1, 64 new tokens); must sample (temperature > 0).
        sampling_seed: Seed of the candidates (each batch's seed derives from it, the epoch and the
            batch index); null: the run's `seed_everything`.
        min_margin: Leave out pairs whose probe scores differ by no more than this.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        probe_path: str,
        num_candidates: int = 4,
        sampling: Optional[SamplingConfig] = None,
        sampling_seed: Optional[int] = None,
        min_margin: float = 0.0,
        **kwargs,
    ):
        if kwargs.get("co_train_probe"):
            raise ConfigError(
                "OnlineDPOModule: model.co_train_probe would train the probe on the pairs' labels, which here "
                "are the probe's own picks (nothing to learn): remove model.co_train_probe"
            )
        if kwargs.get("reference") == "cached":
            raise ConfigError(
                "OnlineDPOModule: model.reference='cached' stores reference log-probs of fixed pairs, but the "
                "pairs here are sampled anew every step: use reference: copy or lora_base"
            )
        sampling = sampling if sampling is not None else SamplingConfig(max_new_tokens=64, temperature=1.0)
        if num_candidates < 2:
            raise ConfigError(f"OnlineDPOModule: model.num_candidates={num_candidates}; a pair needs at least 2 candidates")
        if sampling.temperature <= 0:
            raise ConfigError(
                "OnlineDPOModule: model.sampling.temperature=0 is greedy decoding, which gives k identical "
                "candidates (no pair): set a temperature > 0"
            )
        super().__init__(policy, probe_path=None, **kwargs)  # the probe picks pairs here; it re-ranks nothing
        self.pair_probe_path, self.num_candidates = probe_path, num_candidates
        self.sampling, self.sampling_seed, self.min_margin = sampling, sampling_seed, min_margin
        self.pair_probe = None
        self.generated_tokens = 0
        self.batches_without_pairs = 0
        self.last_pairs: dict = {}

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        super().configure_model()
        if self.pair_probe is None:
            from lit_align.probes import load_probe

            probe = load_probe(self.pair_probe_path, expected_hidden_size=self.policy.config.hidden_size)
            self.pair_probe = probe.requires_grad_(False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        mode = getattr(datamodule, "mode", None)
        if mode != "prompts":
            raise ConfigError(
                f"OnlineDPOModule samples its own pairs from prompts, but data.mode={mode!r}: set data.mode: prompts "
                "(data.path may be a preference file; its prompts are used)"
            )
        if self.sampling_seed is None:
            self.sampling_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def check_reranker(self, reranker: ReRanker) -> None:
        if reranker.effects():
            raise ConfigError(
                f"OnlineDPOModule: data.reranker ({reranker!r}) would re-rank pairs the probe has just picked: remove data.reranker"
            )

    # ------------------------------------------------------------------ pairs
    def batch_seed(self, epoch: int, batch_idx: int) -> int:
        """The candidates' seed for one batch: a function of (sampling_seed, epoch, batch index)."""
        return hash((self.sampling_seed, epoch, batch_idx)) % (2**31)

    @torch.no_grad()
    def score_candidates(self, sequences: list[list[int]]) -> Tensor:
        """Probe scores [N] of prompt ⊕ completion token sequences on the policy's hidden states
        (`select_features` at the last real token, as DPO's probe reads its forward)."""
        from lit_align.probes.features import extract_features

        features = extract_features(
            self.policy, sequences, self.pair_probe.layers, self.pair_probe.pooling, batch_size=len(sequences),
            pad_token_id=self.tokenizer.pad_token_id, progress=False,
        )
        return self.pair_probe(features.to(self.pair_probe.feature_mean.device)).float().cpu()

    def sample_pairs(self, batch: dict, seed: int) -> tuple[Optional[dict], dict]:
        """A preference batch (AlignDataModule's keys, on this device) from a prompts batch, and its stats;
        None when every pair was left out."""
        from lit_align.generation import LeanGenerator

        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        out = LeanGenerator(self.policy, self.tokenizer).generate_ids(prompt_ids, prompt_mask, self.sampling, self.num_candidates, seed)
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        completions = [ids[: int(m.sum())].tolist() for ids, m in zip(out.completion_ids, out.completion_mask)]
        k = self.num_candidates
        scores = self.score_candidates([prompts[i // k] + c for i, c in enumerate(completions)]).view(len(prompts), k)
        picked, left_out = pick_pairs(prompts, completions, scores, self.min_margin)
        distinct = any(len({tuple(c) for c in completions[i * k : (i + 1) * k]}) > 1 for i in range(len(prompts)))
        if distinct and bool((scores.amax(1) == scores.amin(1)).all()):  # different texts, never a different score
            raise ConfigError(
                f"OnlineDPOModule: the probe {self.pair_probe_path} gives every candidate of the batch the same score, so "
                "no pair has a preference (a freshly built probe scores everything 0): train the probe first "
                "(lit-align fit -c configs/probe.yaml)"
            )
        index = batch["index"].tolist()
        self.last_pairs = {
            "index": index, "candidates": completions, "scores": scores,
            "pairs": [(index[i], w, l) for i, w, l in picked],
        }
        stats = {
            "online/generated_tokens_batch": float(out.completion_mask.sum()),
            "online/pairs": float(len(picked)),
            "online/left_out_identical": float(left_out["identical"]),
            "online/left_out_small_margin": float(left_out["small_margin"]),
        }
        if not picked:
            return None, stats
        chosen, rejected = scores.view(-1)[[w for _, w, _ in picked]], scores.view(-1)[[l for _, _, l in picked]]
        stats["online/score_margin"] = float((chosen - rejected).mean())
        examples = [
            {"index": index[i], "prompt_ids": prompts[i], "chosen_ids": completions[w], "rejected_ids": completions[l]}
            for i, w, l in picked
        ]
        pairs = Collator("preference", self.tokenizer.pad_token_id)(examples)
        return {key: v.to(self.device) if torch.is_tensor(v) else v for key, v in pairs.items()}, stats

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Optional[Tensor]:
        pairs, stats = self.sample_pairs(batch, self.batch_seed(self.current_epoch, batch_idx))
        self.generated_tokens += int(stats["online/generated_tokens_batch"])
        stats["online/generated_tokens"] = float(self.generated_tokens)
        self.log_dict(stats, batch_size=len(batch["index"]))
        if pairs is None:  # no update: Lightning still counts the step
            self.batches_without_pairs += 1
            self.log("online/batches_without_pairs", float(self.batches_without_pairs))
            log.warning("online DPO: every pair of batch %d was left out (%s); no update", batch_idx, stats)
            return None
        return super().training_step(pairs, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # a fixed seed per batch, so successive validations compare policies on the same draws
        pairs, _ = self.sample_pairs(batch, self.batch_seed(-1, batch_idx))
        if pairs is not None:
            super().validation_step(pairs, batch_idx)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["online_dpo"] = {"generated_tokens": self.generated_tokens}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.generated_tokens = int(checkpoint.get("online_dpo", {}).get("generated_tokens", 0))


__all__ = ["OnlineDPOModule", "pick_pairs"]
