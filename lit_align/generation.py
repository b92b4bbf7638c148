"""Sampling completions from a causal LM, behind one small interface.

`HFGenerator` wraps Hugging Face `generate` (KV cache, left padding, seeded); `LeanGenerator`
(lit_align.sampling: our own decode loop, the same greedy tokens, less Python per token and one
prefill per prompt for its n samples) is what GRPO, build-cod, evaluate and rerank-candidates
use. Both implement the same two calls: `generate_ids(prompt_ids, prompt_mask, sampling, n, seed)
-> Completions` for training loops and `generate(prompts, ...) -> list[str]` for scripts. An
external generation server plugs in as a `Generator` subclass (docs/grpo.md, "Generation back ends").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from lit_align.data.render import Messages, render_prompt


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    max_new_tokens: int = 64
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    repetition_penalty: float = 1.0
    """>1 discourages repeating tokens."""


@dataclass
class Completions:
    """`num_return_sequences` completions per prompt, prompt-major order."""

    texts: list[str]
    prompt_ids: torch.Tensor  # [N, P] left-padded, one row per completion
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded (pad after EOS)
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first EOS
    truncated: torch.Tensor  # [N] bool: no EOS within max_new_tokens


def completions_from_ids(
    tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, rep: int
) -> Completions:
    """Mask each completion up to and including its first EOS and decode it."""
    eos = tokenizer.eos_token_id
    is_eos = completion_ids == eos
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    completion_mask = (positions[None, :] <= first_eos[:, None]).long()
    texts = [
        tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True)
        for ids, m in zip(completion_ids, completion_mask)
    ]
    device = completion_ids.device
    return Completions(
        texts=texts,
        prompt_ids=prompt_ids.to(device).repeat_interleave(rep, 0),
        prompt_mask=prompt_mask.to(device).repeat_interleave(rep, 0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=~has_eos,
    )


class Generator:
    """The interface: subclasses implement `generate_ids`."""

    tokenizer = None

    def generate_ids(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        num_return_sequences: int = 1,
        generator_seed: Optional[int] = None,
    ) -> Completions:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Make the back end sample from `model`'s current weights (no-op when it is the model)."""

    def encode_prompts(self, prompts: Sequence[str | Messages]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [render_prompt(self.tokenizer, p) for p in prompts]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = side
        return enc["input_ids"], enc["attention_mask"]

    def generate(
        self,
        prompts: Sequence[str | Messages],
        sampling: SamplingConfig,
        num_return_sequences: int = 1,
        batch_size: int = 8,
        seed: Optional[int] = 0,
        progress: bool = True,
        desc: str = "generating",
    ) -> list[str]:
        """Completion texts for `prompts` (`num_return_sequences` each, prompt-major)."""
        texts: list[str] = []
        starts = range(0, len(prompts), batch_size)
        for i, start in enumerate(tqdm(starts, desc=desc, disable=not progress)):
            ids, mask = self.encode_prompts(prompts[start : start + batch_size])
            seed_i = None if seed is None else seed + i
            texts += self.generate_ids(ids, mask, sampling, num_return_sequences, seed_i).texts
        return texts


class HFGenerator(Generator):
    """Batched Hugging Face generation with left padding and the KV cache."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate_ids(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        num_return_sequences: int = 1,
        generator_seed: Optional[int] = None,
    ) -> Completions:
        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        do_sample = sampling.temperature > 0
        kwargs = dict(do_sample=do_sample, max_new_tokens=sampling.max_new_tokens)
        if do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = sampling.repetition_penalty
        eos = self.tokenizer.eos_token_id
        out = model.generate(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.to(device),
            num_return_sequences=num_return_sequences,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            **kwargs,
        )
        if was_training:
            model.train()
        return completions_from_ids(
            self.tokenizer, prompt_ids, prompt_mask, out[:, prompt_ids.shape[1] :], num_return_sequences
        )
