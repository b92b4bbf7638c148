"""GRPO log-probs with each prompt computed once for its whole group of completions.

A rollout holds G completions of every prompt (prompt-major rows). The padded forward runs
`prompt ⊕ completion` for each of the N = B·G rows, so every prompt is computed G times. Here
the distinct prompts run once with the KV cache on (it stays in the autograd graph), the cache
is indexed out to the N rows, and each completion attends to its prompt's keys and values:

    cache, logits_P = model(distinct prompts)           # B rows
    cache           = cache[group]                      # N rows: an index, gradients flow back
    logits_C        = model(completions, cache)         # N rows of C tokens
    logits          = [logits_P[group], logits_C[:, :-1]]   # the logits predicting y_0 … y_{C-1}

Attention masks are the padded forward's (left-padded prompt ⊕ completion mask); positions
count real tokens, as in sampling (RoPE scores depend only on distances, so the log-probs equal
the padded forward's up to float rounding: tests/test_shared_prompt.py). The model's own forward
and LM head run, so LoRA, logit scaling and soft-capping need nothing special. Used when rows
share prompts and the model keeps a plain `DynamicCache`; FSDP2-sharded models, gradient
checkpointing (which turns the cache off) and sliding-window caches take the padded forward
(`completion_logits` picks one).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lit_align.models import is_fsdp_sharded, kv_cache, unwrap_peft


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """Each row's group: runs of consecutive rows with the same prompt share an index 0, 1, …"""
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)
    return torch.cat([same.new_zeros(1, dtype=torch.long), (~same).long().cumsum(0)])


def supports_shared_prompt(model) -> bool:
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
        return False  # checkpointed layers run without a cache
    if is_fsdp_sharded(base):
        return False  # FSDP2: one forward per step keeps the sharding hooks simple
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a model family without a dynamic key/value cache
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def completion_logits(
    model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor, share_prompt: bool = True
) -> Tensor:
    """Logits `[N, C, V]` predicting each completion token: prompts computed once when rows share
    them and the model allows it, else one padded `prompt ⊕ completion` forward."""
    if share_prompt and supports_shared_prompt(model):
        logits = shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        if logits is not None:
            return logits
    c = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=c + 1).logits[:, :-1]


def shared_prompt_logits(
    model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
) -> Optional[Tensor]:
    """Logits `[N, C, V]` predicting each completion token, or None when no two rows share a prompt."""
    group = prompt_groups(prompt_ids, prompt_mask)
    first = torch.ones_like(group, dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    if bool(first.all()):
        return None
    mask = prompt_mask[first]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    prompt_out = model(input_ids=prompt_ids[first], attention_mask=mask, position_ids=positions,
                       **kv_cache(cache), use_cache=True, logits_to_keep=1)
    cache.batch_select_indices(group)
    c = completion_ids.shape[1]
    positions = positions[group, -1:] + 1 + torch.arange(c, device=positions.device)
    out = model(input_ids=completion_ids, attention_mask=torch.cat([mask[group], completion_mask], dim=1),
                position_ids=positions, **kv_cache(cache), use_cache=True, logits_to_keep=c)
    return torch.cat([prompt_out.logits[group], out.logits[:, :-1]], dim=1)
