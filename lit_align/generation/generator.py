"""Sampling completions from a causal LM, behind one small interface.

`Generator` is the interface: `generate_ids(prompt_ids, prompt_mask, sampling, n, seed) -> Completions`
for training loops and `generate(prompts, ...) -> list[str]` for scripts. A generator that samples
from a model in this process implements only `completion_ids` (the token ids); `generate_ids` around
it picks the weights (`sampling.dtype`), puts the model in eval mode for the call and masks and
decodes the completions. `LeanGenerator` (lit_align.generation.lean: our own decode loop, the same
greedy tokens, less Python per token and one prefill per prompt for its n samples) is what GRPO,
build-cod, evaluate and rerank-candidates use; `HFGenerator` (here) wraps Hugging Face `generate`
(KV cache, left padding, seeded). An external generation server plugs in as a `Generator` subclass
that implements `generate_ids` itself (docs/grpo.md, "Generation back ends").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from lit_align.data.render import Messages, render_prompt
from lit_align.generation.config import SamplingConfig


DTYPES = {"bfloat16": torch.bfloat16}


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` with its floating parameters in `dtype` and buffers as they are (what loading
    the checkpoint in `dtype` gives: rotary frequencies stay float32), cast one by one into the copy
    (never a whole float32 copy first). Its modules share `model`'s hook dicts, so hooks added to or
    removed from `model` later (e.g. a cost meter's) apply to the copy too."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype) if p.is_floating_point() else p.detach().clone(), requires_grad=False)
            for p in model.parameters()}
    copied = copy.deepcopy(model, memo)
    for source, target in zip(model.modules(), copied.modules(), strict=True):
        target.__dict__.update({k: v for k, v in vars(source).items() if "hooks" in k and isinstance(v, dict)})
    return copied


@torch.no_grad()
def refresh_copy(copied: torch.nn.Module, model: torch.nn.Module) -> None:
    """Write `model`'s current parameters into `cast_copy(model)`'s (cast on the way)."""
    for target, source in zip(copied.parameters(), model.parameters(), strict=True):
        target.copy_(source)


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
    """The interface. Subclasses honour every `SamplingConfig` field or refuse it: those that sample
    from `self.model` implement `completion_ids` (`sampling_model` does `dtype` for them), others
    (a server) override `generate_ids`."""

    _copy: Optional[tuple[str, torch.nn.Module]] = None  # (dtype, cast_copy(self.model))

    def __init__(self, model=None, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    def sampling_model(self, sampling: SamplingConfig) -> torch.nn.Module:
        """`self.model`, or its copy in `sampling.dtype` holding its current weights."""
        dtype = DTYPES.get(sampling.dtype)
        if dtype is None or all(p.dtype == dtype for p in self.model.parameters() if p.is_floating_point()):
            return self.model
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError(f"sampling.dtype={sampling.dtype!r} copies the model, which is not done under "
                             "torch.distributed (sharded weights): set sampling.dtype to 'model'")
        if self._copy is None or self._copy[0] != sampling.dtype:
            self._copy = None  # free the old copy before making the new one
            self._copy = (sampling.dtype, cast_copy(self.model, dtype))
        else:
            refresh_copy(self._copy[1], self.model)
        return self._copy[1]

    @torch.no_grad()
    def generate_ids(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        num_return_sequences: int = 1,
        generator_seed: Optional[int] = None,
    ) -> Completions:
        """`num_return_sequences` completions per left-padded prompt, from `completion_ids` on
        `sampling_model(sampling)` in eval mode (its training mode restored afterwards)."""
        model = self.sampling_model(sampling)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            ids = self.completion_ids(model, prompt_ids.to(device), prompt_mask.to(device), sampling,
                                      num_return_sequences, generator_seed)
        finally:
            model.train(was_training)
        return completions_from_ids(self.tokenizer, prompt_ids, prompt_mask, ids, num_return_sequences)

    def completion_ids(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
                       n: int, generator_seed: Optional[int]) -> torch.Tensor:
        """Completion ids `[B·n, T]` from `model` (prompt-major, pad after EOS) for prompts on its device."""
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

    def completion_ids(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
                       n: int, generator_seed: Optional[int]) -> torch.Tensor:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        do_sample = sampling.temperature > 0
        kwargs = dict(do_sample=do_sample, max_new_tokens=sampling.max_new_tokens)
        if do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = sampling.repetition_penalty
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            num_return_sequences=n,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            **kwargs,
        )
        return out[:, prompt_ids.shape[1] :]
