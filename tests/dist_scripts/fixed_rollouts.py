"""GRPO with fixed completions per prompt, for comparing a 2-process run with a 1-process run on
the same data (importable via PYTHONPATH as "fixed_rollouts.FixedRolloutGRPO").

Sampling is the one thing replaced: a prompt's G completions are token ids drawn from a
generator seeded by the prompt text, with lengths that differ between prompts (so the
processes hold different numbers of active tokens), ending in EOS. Scoring, advantages,
log-probs, the loss, its normalisation and the optimiser are GRPOModule's own.
"""

from __future__ import annotations

import zlib

import torch

from lit_align.generation import completions_from_ids
from lit_align.modules.grpo import GRPOModule


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def completion_lengths(prompt, g: int) -> list[int]:
    """Tokens before EOS of the prompt's G completions (1.. to 13.., by prompt)."""
    key = zlib.crc32(prompt_key(prompt).encode())
    return [1 + (key % 4) * 4 + j for j in range(g)]


class FixedRolloutGRPO(GRPOModule):
    def sample(self, batch: dict, seed):
        g, width = self.sampling.num_generations, self.sampling.max_new_tokens
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows = []
        for prompt in batch["prompt"]:
            gen = torch.Generator().manual_seed(zlib.crc32(prompt_key(prompt).encode()))
            for length in completion_lengths(prompt, g):
                ids = torch.full((width,), pad)
                ids[:length] = torch.randint(3, 300, (length,), generator=gen)
                ids[min(length, width - 1)] = eos
                rows.append(ids)
        device = batch["prompt_input_ids"].device
        return completions_from_ids(self.tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                    torch.stack(rows).to(device), g)


def length_reward(prompts, completions, **columns):
    """Characters of the completion: differs within each group, so advantages are non-zero."""
    return [float(len(c)) for c in completions]
