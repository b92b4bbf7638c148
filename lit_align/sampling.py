"""A lean sampling loop: prefill each prompt once, share its KV cache among its n completions.

For the small models lit_align trains on a CPU, transformers `generate` costs more than the
tokens it computes: it prefills every prompt n times (once per returned sequence) and runs a
general-purpose loop (logits processors, stopping criteria, cache and mask bookkeeping) around
each decoded token. This loop does only what `SamplingConfig` asks for:

    cache  = forward(shared prefix)                 # once, when the B prompts start alike
    cache  = forward(prompts after it)              # B rows, once
    cache  = repeat_interleave(cache, n)            # B·n rows share their prompt's keys/values,
                                                    # in buffers sized for the whole generation
    repeat up to max_new_tokens times:
        y_t   = pick(logits)                        # penalty, temperature, top-k, top-p; or argmax
        y_t   = pad where the row already ended     # rows stop at their first EOS
        stop when every row has ended (never early under torch.distributed: ranks step together)
        drop ended rows from the forwards once they are 1/8 of the rows computed
        logits = forward(y_t, cache)                # keys/values written in place

A shared prefix is common: a chat template's system prompt, or a worked example shown before every
request (SRMIR's one-shot CoD prompt is 211 SmolLM2 tokens, of which the request is the last ~40).

Greedy decoding gives the token ids of `generate(do_sample=False)` (tests/test_sampling.py).
Sampling draws from a `torch.Generator` seeded with `generator_seed`, one uniform per row and step
whether or not the row is still computed, so a step is reproducible without touching the global
RNG and a row's tokens do not depend on when the others ended. Works with any causal LM that takes
a `DynamicCache` (Llama, Qwen, Mistral, SmolLM, peft-wrapped ones); anything else: `HFGenerator`.
`int8_for_generation` (opt-in) swaps a generation-only model's linear layers for int8 ones.
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


NUCLEUS_CANDIDATES = (64, 1024)  # sorting a 49k vocabulary costs more than the rest of a decode step


def outside_nucleus(logits: Tensor, top_p: float) -> Tensor:
    """The tokens top-p drops: those whose more likely tokens already hold top_p of the mass (the
    most likely always stays). Each row's nucleus is looked for among its NUCLEUS_CANDIDATES[0]
    likeliest tokens, which is exact when they hold more than top_p; the rows where they do not
    try the next count, and the last rows sort the whole vocabulary."""
    drop = torch.ones_like(logits, dtype=torch.bool)
    rows = torch.arange(len(logits), device=logits.device)
    logz = logits.logsumexp(-1, keepdim=True)
    for k in (*(k for k in NUCLEUS_CANDIDATES if k < logits.shape[-1]), logits.shape[-1]):
        top, order = logits[rows].topk(k, dim=-1)
        probs = (top - logz[rows]).exp()
        mass = probs.cumsum(-1)
        done = mass[:, -1] > top_p if k < logits.shape[-1] else torch.ones_like(rows, dtype=torch.bool)
        drop[rows[done]] = drop[rows[done]].scatter(-1, order[done], (mass - probs)[done] > top_p)
        rows = rows[~done]
        if not len(rows):
            return drop
    return drop


def draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """One token per row by inverting the CDF at `uniform` (one number in [0, 1) per row, `[rows, 1]`):
    `torch.multinomial` would draw one per vocabulary entry. Zero-probability tokens are never picked."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = uniform * total
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


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers sized for the whole generation:
    each decoded token is written in place, where `DynamicLayer` concatenates the cache into a fresh
    copy at every token (its cost grows with the context, ~10 % of a SmolLM2 decode step)."""

    def __init__(self, layer: DynamicLayer, capacity: int):
        super().__init__()
        rows, heads, length, dim = layer.keys.shape
        self.key_buffer = layer.keys.new_empty(rows, heads, capacity, dim)
        self.value_buffer = layer.values.new_empty(rows, heads, capacity, layer.values.shape[-1])
        self.key_buffer[:, :, :length] = layer.keys
        self.value_buffer[:, :, :length] = layer.values
        self.device, self.is_initialized = layer.keys.device, True
        self._view(length)

    def _view(self, length: int) -> None:
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            raise RuntimeError(f"PreallocatedLayer holds {self.key_buffer.shape[2]} positions; {end} asked")
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self._view(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        length = self.keys.shape[-2]
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._view(length)


def preallocate(cache: DynamicCache, extra: int) -> bool:
    """Give every layer of a filled cache room for `extra` more positions (`PreallocatedLayer`).
    Only plain `DynamicLayer`s (sliding-window layers keep theirs); says whether it did."""
    if not cache.layers or any(type(x) is not DynamicLayer or not x.is_initialized for x in cache.layers):
        return False
    cache.layers = [PreallocatedLayer(x, x.keys.shape[-2] + extra) for x in cache.layers]
    return True


COMPACT_AT = 1 / 8  # drop ended rows from the forwards once they are this share of the rows computed


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
    """Completion ids `[B·n, T]` (prompt-major, pad after EOS, T ≤ max_new_tokens) for left-padded prompts.

    The forwards compute only `rows` (indices into the B·n outputs): rows that ended are dropped from
    the cache, mask and positions once they are `COMPACT_AT` of those computed. Every step still draws
    one uniform per output row, so a row's sample does not depend on when others were dropped."""
    cache = DynamicCache(config=model.config)
    out, mask, positions = prefill(model, prompt_ids, prompt_mask.long(), cache, min_shared_prefix)
    cache.batch_repeat_interleave(n)
    # A one-token query needs only the key padding mask: handing sdpa a ready 4-D mask skips
    # transformers' per-step mask building (not for eager attention or sliding-window layers).
    ready_mask = preallocate(cache, sampling.max_new_tokens) and model.config._attn_implementation == "sdpa"
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)
    width, steps, device = mask.shape[1], sampling.max_new_tokens, logits.device
    keys = torch.cat([mask.bool(), mask.new_ones(len(mask), steps, dtype=torch.bool)], 1).repeat_interleave(n, 0)
    position = positions[:, -1:].repeat_interleave(n, 0)
    seen = prompt_ids.repeat_interleave(n, 0)  # only read with a repetition penalty
    rows = torch.arange(len(logits), device=device)
    finished = torch.zeros(len(logits), dtype=torch.bool, device=device)
    tokens = torch.full((len(logits), steps), pad_token_id, dtype=torch.long, device=device)
    stop_early = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    for t in range(steps):
        if sampling.repetition_penalty != 1.0:
            logits = penalize_repeats(logits, seen, sampling.repetition_penalty)
        if sampling.temperature > 0:
            uniform = torch.rand(len(tokens), 1, generator=generator, device=device)[rows]
            token = draw(filter_logits(logits, sampling).softmax(-1), uniform)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished[rows], pad_token_id)
        tokens[rows, t] = token
        finished[rows] |= token == eos_token_id
        if t == steps - 1 or (stop_early and bool(finished.all())):
            return tokens[:, : t + 1]
        if sampling.repetition_penalty != 1.0:
            seen = torch.cat([seen, token[:, None]], dim=1)
        ended = finished[rows]
        if int(ended.sum()) >= COMPACT_AT * len(rows) and not bool(ended.all()):
            keep = (~ended).nonzero().squeeze(1)
            rows, token, keys, position, seen = rows[keep], token[keep], keys[keep], position[keep], seen[keep]
            cache.batch_select_indices(keep)
        position = position + 1
        length = width + t + 1
        key_mask = keys[:, None, None, :length] if ready_mask else keys[:, :length].long()
        out = model(input_ids=token[:, None], attention_mask=key_mask, position_ids=position, **kv_cache(cache), use_cache=True)
        logits = out.logits[:, -1].float()
    return tokens[:, :0]


class Int8Linear(torch.nn.Module):
    """A generation-only stand-in for `nn.Linear` on int8 weights and activations:

        y = (round(x / s_x) · round(W / s_w)ᵀ) · s_x · s_wᵀ + b,   s_w = max|W_j·| / 127,  s_x = max|x_i·| / 127

    one scale per output channel of W (computed once) and per row of x (at every call, so a row's
    output does not depend on the other rows), products summed exactly in int32 (`torch._int_mm`)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.register_buffer("weight_scale", weight.abs().amax(1).clamp(min=1e-12) / 127)
        self.register_buffer("weight_t", (weight / self.weight_scale[:, None]).round().to(torch.int8).t().contiguous())
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_dtype = linear.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        y = torch._int_mm((rows / scale).round().to(torch.int8), self.weight_t).float() * (scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(self.out_dtype).reshape(*x.shape[:-1], y.shape[-1])


def int8_for_generation(model):
    """Replace every `nn.Linear` of `model` (the LM head too; a tied input embedding stays as it is)
    by an `Int8Linear`, in place, and return the model. Its matmuls cost ~1/4 of float32 ones on a
    CPU; its logits differ from the float32 model's (docs/benchmarks.md: how the samples differ).
    For generation only: the model can no longer be trained or saved as a Hugging Face checkpoint."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return model


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
