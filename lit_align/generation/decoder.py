"""The lean loop's forwards (lit_align.generation.lean): the prompts prefilled with a prefix they
all share computed once (`prefill`), a KV cache preallocated for the whole generation
(`PreallocatedLayer`), one-token attention over the shared prefix's keys stored once
(`shared_prefix_attention`) and the LM head in column blocks (`ChunkedHead`), both on a view of
the model (`attention_view`), tied together by `Decoder`. The logits equal the plain forward's.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor
from transformers import AttentionInterface, DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, apply_rotary_pos_emb,
)

from lit_align.generation.linear import ChunkedHead, chunkable_head
from lit_align.models import kv_cache


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
    output (last-position logits), the key mask over the cache, the rows' position ids and the
    length of the prefix prefilled once (0: none)."""
    p = shared_prefix_length(prompt_ids, mask)
    if p < min_shared_prefix or any(type(x) is not DynamicLayer for x in cache.layers):  # not with sliding windows
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, **kv_cache(cache),
                    use_cache=True, logits_to_keep=1)
        return out, mask, positions, 0
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
    return out, mask, positions, p


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers sized for the whole generation:
    each decoded token is written in place, where `DynamicLayer` concatenates the cache into a fresh
    copy at every token (its cost grows with the context, ~10 % of a SmolLM2 decode step)."""

    def __init__(self, layer: DynamicLayer, extra: int, skip: int = 0):
        """`layer`'s keys and values from position `skip` on, and room for `extra` more positions."""
        super().__init__()
        keys, values = layer.keys[:, :, skip:], layer.values[:, :, skip:]
        rows, heads, length, dim = keys.shape
        self.key_buffer = keys.new_empty(rows, heads, length + extra, dim)
        self.value_buffer = values.new_empty(rows, heads, length + extra, values.shape[-1])
        self.key_buffer[:, :, :length] = keys
        self.value_buffer[:, :, :length] = values
        self.device, self.is_initialized = keys.device, True
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


SHARED_PREFIX_ATTENTION = "lit_align_shared_prefix_sdpa"
REFUSED_ATTENTION_KWARGS = ("position_bias", "s_aux", "sinks", "softcap", "sliding_window")  # what the formula leaves out


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None, **kwargs):
    """sdpa for one-token queries over the keys of a prefix all rows share, then each row's own:

        softmax(q·[K_p ; K_i]ᵀ · scaling + [0 ; mask_i]) · [V_p ; V_i]

    The prefix's keys and values are stored once (`shared_prefix[layer]`, `[kv heads, P, dim]`), so
    q·K_pᵀ and the prefix's share of the output are one matmul per key/value head for all rows, where
    sdpa on repeated keys runs many small ones (rows × heads) over the whole context. Without a
    shared prefix (or for longer queries) this is transformers' sdpa."""
    if shared_prefix is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if given := [k for k in REFUSED_ATTENTION_KWARGS if kwargs.get(k) is not None] + (["dropout"] if dropout else []):
        raise ValueError(f"shared-prefix attention covers plain causal sdpa in eval mode; this model's attention passes "
                         f"{given}: load it with attn_implementation='eager' or generate with HFGenerator")
    prefix_keys, prefix_values = shared_prefix[module.layer_idx]
    rows, heads, _, dim = query.shape
    groups, length = prefix_keys.shape[:2]
    q = query.view(rows, groups, heads // groups, dim)  # query head h reads key/value head h // (heads / groups)
    shared = torch.bmm(q.transpose(0, 1).reshape(groups, -1, dim), prefix_keys.transpose(1, 2))
    own = torch.matmul(q, key.transpose(-1, -2))
    if attention_mask is not None:
        own = own.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else own + attention_mask
    scores = torch.cat([shared.view(groups, rows, -1, length).transpose(0, 1), own], -1)
    probs = (scores * (dim**-0.5 if scaling is None else scaling)).softmax(-1)
    out = torch.matmul(probs[..., length:], value)
    out += torch.bmm(probs[..., :length].transpose(0, 1).reshape(groups, -1, length), prefix_values).view(groups, rows, -1, dim).transpose(0, 1)
    return out.reshape(rows, 1, heads, dim), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)


def attention_view(model, implementation: str, replace: Optional[dict] = None):
    """`model` with another attention implementation, without changing `model`: a tree of shallow
    module copies sharing its parameters, buffers and hooks, whose config is a copy naming
    `implementation`, with `replace`'s modules ({module of `model`: stand-in}) swapped in. None when
    a module reads a config other than the model's (then it would not)."""
    config = copy.copy(model.config)
    config._attn_implementation_internal = implementation
    replace = replace or {}

    def view(module):
        if module in replace:
            return replace[module]
        own = module.__dict__.get("config")
        if isinstance(own, PretrainedConfig) and own is not model.config:
            raise LookupError
        new = copy.copy(module)
        new._modules = {name: None if child is None else view(child) for name, child in module._modules.items()}
        if own is not None:
            new.__dict__["config"] = config
        return new

    try:
        return view(model)
    except LookupError:
        return None


def inlinable(model) -> bool:
    """Whether `llama_decode_step` computes `model`'s forward: a plain Llama in eval mode (no
    subclass, no peft wrapper) without forward hooks on the modules whose `forward` it inlines."""
    if type(model) is not LlamaForCausalLM or type(model.model) is not LlamaModel or model.training:
        return False
    layers = model.model.layers[: model.config.num_hidden_layers]
    skipped = [model, model.model, *layers, *(layer.self_attn for layer in layers)]
    if not all(type(x) is LlamaDecoderLayer and type(x.self_attn) is LlamaAttention for x in layers):
        return False
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in skipped)


def llama_decode_step(model, token: Tensor, mask: Tensor, position: Tensor, cache, **attention_kwargs) -> Tensor:
    """`model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache).logits[:, -1]`
    for a Llama (`inlinable`) and a ready 4-D mask: the same modules and functions in the same
    order as transformers' `LlamaForCausalLM.forward`, without its per-call wrappers (argument
    handling, output capture, mask building), which cost ~1/4 of a small model's decode step."""
    inner = model.model
    hidden = inner.embed_tokens(token)  # [rows, hidden]: the one-token sequence axis only where attention needs it
    rope = inner.rotary_emb(hidden, position_ids=position)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, None)
    for layer in inner.layers[: model.config.num_hidden_layers]:
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (len(x), 1, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        k, v = cache.update(k, v, attn.layer_idx)
        out, _ = attend(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, position_ids=position,
                        use_cache=True, **attention_kwargs)
        hidden = hidden + attn.o_proj(out.reshape(len(x), -1).contiguous())
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))


class Decoder:
    """The decode loop's forwards: one token for each row still computed, over a cache with room for
    every step (`PreallocatedLayer`) and a key mask written once. With sdpa and a prompt prefix all
    rows share, that prefix's keys and values are kept once and read by `shared_prefix_attention`;
    a float32 LM head on the CPU runs in column blocks (`ChunkedHead`, same logits). Both on a view
    of the model (`attention_view`): the model itself is not changed."""

    def __init__(self, model, cache: DynamicCache, mask: Tensor, position: Tensor, prefix: int, steps: int):
        plain = bool(cache.layers) and all(type(x) is DynamicLayer and x.is_initialized for x in cache.layers)
        sdpa = model.config._attn_implementation == "sdpa"
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()  # e.g. FSDP's hooks
        shared = plain and sdpa and bool(prefix) and not distributed
        head = None if distributed else chunkable_head(model)
        view = None
        if shared or head is not None:
            implementation = SHARED_PREFIX_ATTENTION if shared else model.config._attn_implementation
            view = attention_view(model, implementation, {head: ChunkedHead(head)} if head is not None else None)
        shared = shared and view is not None
        self.model, self.cache, self.position = view or model, cache, position
        self.shared = [(x.keys[0, :, :prefix].clone(), x.values[0, :, :prefix].clone()) for x in cache.layers] if shared else None
        skip = prefix if shared else 0
        for i, layer in enumerate(cache.layers if plain else []):  # one at a time: the old layer is freed at once
            cache.layers[i] = PreallocatedLayer(layer, steps, skip)
        # A one-token query needs only the key padding mask: handing sdpa a ready 4-D mask skips
        # transformers' per-step mask building (not for eager attention or sliding-window layers).
        self.ready_mask = plain and sdpa
        self.inline = self.ready_mask and inlinable(self.model)  # with sdpa or the shared-prefix attention
        self.keys = torch.cat([mask[:, skip:].bool(), mask.new_ones(len(mask), steps, dtype=torch.bool)], 1)
        if self.inline:  # additive (0 / -inf): what sdpa makes of a boolean mask at every call
            dtype = self.model.model.embed_tokens.weight.dtype
            self.keys = torch.zeros(self.keys.shape, dtype=dtype, device=mask.device).masked_fill(~self.keys, float("-inf"))
        self.width = mask.shape[1] - skip

    def keep(self, rows: Tensor) -> None:
        """Compute only these rows (indices into the current ones) from now on."""
        self.cache.batch_select_indices(rows)
        self.keys, self.position = self.keys[rows], self.position[rows]

    def __call__(self, token: Tensor, step: int) -> Tensor:
        """Float logits `[rows, vocab]` after each row's `step`-th new token."""
        self.position = self.position + 1
        length = self.width + step + 1
        mask = self.keys[:, None, None, :length] if self.ready_mask else self.keys[:, :length].long()
        shared = {"shared_prefix": self.shared} if self.shared else {}
        if self.inline:
            return llama_decode_step(self.model, token, mask, self.position, self.cache, **shared).float()
        out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=self.position, **kv_cache(self.cache),
                         use_cache=True, **shared)
        return out.logits[:, -1].float()
