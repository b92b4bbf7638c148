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
        logits = forward(y_t, cache)                # keys/values written in place; the LM head in
                                                    # column blocks (ChunkedHead: same logits, faster)

A shared prefix is common: a chat template's system prompt, or a worked example shown before every
request (SRMIR's one-shot CoD prompt is 211 SmolLM2 tokens, of which the request is the last ~40).

Greedy decoding gives the token ids of `generate(do_sample=False)` (tests/test_sampling.py).
Sampling draws from a `torch.Generator` seeded with `generator_seed`, one uniform per row and step
whether or not the row is still computed, so a step is reproducible without touching the global
RNG and a row's tokens do not depend on when the others ended. Works with any causal LM that takes
a `DynamicCache` (Llama, Qwen, Mistral, SmolLM, peft-wrapped ones); anything else: `HFGenerator`.
`SamplingConfig(dtype="bfloat16")` samples from a bfloat16 copy of the model (`Generator.sampling_model`);
`int8_for_generation` (opt-in, Python only; lit_align.generation.linear) swaps a generation-only
model's linear layers for int8 ones. The picking is in lit_align.generation.logits, the forwards
(prefill, cache, attention, LM head) in lit_align.generation.decoder.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache

from lit_align.generation.config import SamplingConfig
from lit_align.generation.decoder import MIN_SHARED_PREFIX, Decoder, prefill
from lit_align.generation.generator import Generator
from lit_align.generation.logits import draw, filter_logits, penalize_repeats


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
    out, mask, positions, prefix = prefill(model, prompt_ids, prompt_mask.long(), cache, min_shared_prefix)
    cache.batch_repeat_interleave(n)
    steps = sampling.max_new_tokens
    decoder = Decoder(model, cache, mask.repeat_interleave(n, 0), positions[:, -1:].repeat_interleave(n, 0), prefix, steps)
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)
    seen = prompt_ids.repeat_interleave(n, 0)  # only read with a repetition penalty
    rows = None  # all output rows, until ended ones are dropped (then their indices)
    ended = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)  # of the rows computed
    tokens = torch.full((len(logits), steps), pad_token_id, dtype=torch.long, device=logits.device)
    stop_early = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    for t in range(steps):
        if sampling.repetition_penalty != 1.0:
            logits = penalize_repeats(logits, seen, sampling.repetition_penalty)
        if sampling.temperature > 0:
            uniform = torch.rand(len(tokens), 1, generator=generator, device=logits.device)
            token = draw(filter_logits(logits, sampling).softmax(-1), uniform if rows is None else uniform[rows])
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(ended, pad_token_id)
        if rows is None:  # plain column writes while no row was dropped (index_put costs more per token)
            tokens[:, t] = token
        else:
            tokens[rows, t] = token
        ended = ended | (token == eos_token_id)
        done = int(ended.sum())  # the only host sync per token; dropped rows had all ended
        if t == steps - 1 or (stop_early and done == len(ended)):
            return tokens[:, : t + 1]
        if sampling.repetition_penalty != 1.0:
            seen = torch.cat([seen, token[:, None]], dim=1)
        if done >= COMPACT_AT * len(ended) and done < len(ended):
            keep = (~ended).nonzero().squeeze(1)
            rows = keep if rows is None else rows[keep]
            token, seen, ended = token[keep], seen[keep], ended[keep]
            decoder.keep(keep)
        logits = decoder(token, t)
    return tokens[:, :0]


class LeanGenerator(Generator):
    """`Generator` on `sample_ids`: the prompt's KV cache shared by its completions, a tight decode loop."""

    def completion_ids(self, model, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig,
                       n: int, generator_seed: Optional[int]) -> Tensor:
        generator = None if generator_seed is None else torch.Generator(prompt_ids.device).manual_seed(generator_seed)
        return sample_ids(model, prompt_ids, prompt_mask, sampling, n, self.tokenizer.eos_token_id,
                          self.tokenizer.pad_token_id, generator)
