"""A lean sampling loop: prefill each prompt once, share its KV cache among its n completions.

For the small models lit_align trains on a CPU, transformers `generate` costs more than the
tokens it computes: it prefills every prompt n times (once per returned sequence) and runs a
general-purpose loop (logits processors, stopping criteria, cache and mask bookkeeping) around
each decoded token. This loop does only what `SamplingConfig` asks for:

    cache  = forward(shared prefix)                 # once, when the B prompts start alike
    cache  = forward(prompts after it)              # B rows, once
    cache  = repeat_interleave(cache, n)            # B·n rows share their prompt's keys/values
    repeat up to max_new_tokens times:
        y_t   = pick(logits)                        # penalty, temperature, top-k, top-p; or argmax
        y_t   = pad where the row already ended     # rows stop at their first EOS
        stop when every row has ended (never early under torch.distributed: ranks step together)
        logits = forward(y_t, cache)

A shared prefix is common: a chat template's system prompt, or a worked example shown before every
request (SRMIR's one-shot CoD prompt is 211 SmolLM2 tokens, of which the request is the last ~40).

Greedy decoding gives the token ids of `generate(do_sample=False)` (tests/test_sampling.py).
Sampling draws from a `torch.Generator` seeded with `generator_seed`, so a step is
reproducible without touching the global RNG. Works with any causal LM that takes a
`DynamicCache` (Llama, Qwen, Mistral, SmolLM, peft-wrapped ones); anything else: `HFGenerator`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lit_align.generation import Completions, Generator, SamplingConfig, completions_from_ids
from lit_align.models import kv_cache


def filter_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p): removed tokens get -inf."""
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        logits = logits.masked_fill(outside_nucleus(logits, sampling.top_p), float("-inf"))
    return logits


NUCLEUS_CANDIDATES = 64  # sorting a 49k vocabulary every step costs more than the rest of the pick


def outside_nucleus(logits: Tensor, top_p: float) -> Tensor:
    """The tokens top-p drops: those whose more likely tokens already hold top_p of the mass (the
    most likely always stays). Tried on the top NUCLEUS_CANDIDATES first, which is exact whenever
    they hold more than top_p in every row; otherwise the whole vocabulary is sorted."""
    for k in (min(NUCLEUS_CANDIDATES, logits.shape[-1]), logits.shape[-1]):
        top, order = logits.topk(k, dim=-1)
        probs = (top - logits.logsumexp(-1, keepdim=True)).exp()
        mass = probs.cumsum(-1)
        if k == logits.shape[-1] or bool((mass[:, -1] > top_p).all()):
            drop = logits.new_ones(logits.shape, dtype=torch.bool)
            return drop.scatter(-1, order, mass - probs > top_p)


def draw(probs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One token per row by inverting the CDF at a uniform draw: one random number per row
    (`torch.multinomial` draws one per vocabulary entry). Zero-probability tokens are never picked."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device) * total
    u = u.minimum(total.nextafter(torch.zeros_like(total)))  # strictly below the total, even after rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def penalize_repeats(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty on every token already in the row (prompt or completion)."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


MIN_SHARED_PREFIX = 16  # shorter shared prefixes are not worth a forward of their own


def shared_prefix_length(prompt_ids: Tensor, prompt_mask: Tensor) -> int:
    """How many leading tokens all left-padded rows share, leaving each row at least one of its own."""
    lengths, columns = prompt_mask.sum(-1), torch.arange(prompt_ids.shape[1], device=prompt_ids.device)
    starts = prompt_ids.shape[1] - lengths
    if len(prompt_ids) < 2 or not torch.equal(prompt_mask.bool(), columns >= starts[:, None]):
        return 0  # one row, or not left-padded
    leading = prompt_ids.gather(1, starts[:, None] + columns[: int(lengths.min()) - 1])
    return int((leading == leading[:1]).all(0).cumprod(0).sum())


def prefill(model, prompt_ids: Tensor, mask: Tensor, cache: DynamicCache, min_shared_prefix: int):
    """Fill `cache` with the left-padded prompts: their shared prefix once (when it is at least
    `min_shared_prefix` tokens), then each row's rest, left-padded after it. Returns the forward's
    output (last-position logits), the key mask over the cache and the rows' position ids."""
    p = shared_prefix_length(prompt_ids, mask)
    if p < min_shared_prefix or any(type(x) is not DynamicLayer for x in cache.layers):  # not with sliding windows
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, **kv_cache(cache),
                    use_cache=True, logits_to_keep=1)
        return out, mask, positions
    width, device = prompt_ids.shape[1], prompt_ids.device
    start = width - int(mask[0].sum())  # row 0's first token
    model(input_ids=prompt_ids[:1, start : start + p], position_ids=torch.arange(p, device=device)[None],
          **kv_cache(cache), use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(len(prompt_ids))
    rest = int(mask.sum(-1).max()) - p  # the longest row's tokens after the prefix
    rest_mask = (torch.arange(width - rest, width, device=device) >= (width - mask.sum(-1) + p)[:, None]).long()
    positions = p + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([mask.new_ones(len(mask), p), rest_mask], dim=1)
    out = model(input_ids=prompt_ids[:, width - rest :], attention_mask=mask, position_ids=positions,
                **kv_cache(cache), use_cache=True, logits_to_keep=1)
    return out, mask, positions


@torch.no_grad()
def sample_ids(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingConfig,
    n: int,
    eos_token_id: int,
    pad_token_id: int,
    generator: Optional[torch.Generator] = None,
    min_shared_prefix: int = MIN_SHARED_PREFIX,
) -> Tensor:
    """Completion ids `[B·n, T]` (prompt-major, pad after EOS, T ≤ max_new_tokens) for left-padded prompts."""
    cache = DynamicCache(config=model.config)
    out, mask, positions = prefill(model, prompt_ids, prompt_mask.long(), cache, min_shared_prefix)
    cache.batch_repeat_interleave(n)
    # A one-token query needs only the key padding mask: handing sdpa a ready 4-D mask skips
    # transformers' per-step mask building (not for eager attention or sliding-window layers).
    ready_mask = model.config._attn_implementation == "sdpa" and all(type(x) is DynamicLayer for x in cache.layers)
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)
    mask = mask.repeat_interleave(n, 0)
    position = positions[:, -1:].repeat_interleave(n, 0)
    seen = prompt_ids.repeat_interleave(n, 0)  # only read with a repetition penalty
    finished = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    stop_early = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    tokens = []
    for t in range(sampling.max_new_tokens):
        if sampling.repetition_penalty != 1.0:
            logits = penalize_repeats(logits, seen, sampling.repetition_penalty)
        if sampling.temperature > 0:
            probs = filter_logits(logits, sampling).softmax(-1)
            token = draw(probs, generator)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, pad_token_id)
        tokens.append(token)
        finished |= token == eos_token_id
        if t == sampling.max_new_tokens - 1 or (stop_early and bool(finished.all())):
            break
        if sampling.repetition_penalty != 1.0:
            seen = torch.cat([seen, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask[:, None, None, :].bool() if ready_mask else mask,
                    position_ids=position, **kv_cache(cache), use_cache=True)
        logits = out.logits[:, -1].float()
    return torch.stack(tokens, dim=1)


class LeanGenerator(Generator):
    """`Generator` on `sample_ids`: the prompt's KV cache shared by its completions, a tight decode loop."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def generate_ids(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        sampling: SamplingConfig,
        num_return_sequences: int = 1,
        generator_seed: Optional[int] = None,
    ) -> Completions:
        model = self.model
        device = next(model.parameters()).device
        generator = None
        if generator_seed is not None:
            generator = torch.Generator(device).manual_seed(generator_seed)
        was_training = model.training
        model.eval()
        try:
            ids = sample_ids(
                model, prompt_ids.to(device), prompt_mask.to(device), sampling, num_return_sequences,
                self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, generator,
            )
        finally:
            model.train(was_training)
        return completions_from_ids(self.tokenizer, prompt_ids, prompt_mask, ids, num_return_sequences)
