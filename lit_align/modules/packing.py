"""Padding-free log-probs: lay tokens out densely, run the backbone once, score completions only.

A DPO batch of 8 HH-RLHF pairs padded to its longest sequence is 30–50 % padding, the chosen and
rejected rows repeat the same (long, multi-turn) prompt, and a plain causal-LM forward projects
every position through the vocabulary-sized LM head. Two layouts remove that work:

* shared prompt (`plan_shared_prompt`, for [chosen; rejected] halves with equal prompts): one row
  per pair, `prompt ⊕ chosen ⊕ rejected`, with a 4-D mask in which rejected tokens see the prompt
  and themselves but not the chosen tokens, and position ids that continue the prompt for both
  completions — the prompt is computed once instead of twice and no pair is padded to another's
  prompt;
* packing (`plan_packing`, any right-padded rows): sequences share rows of the padded width (first
  fit, longest first); position ids restart at 0 for each, from which transformers builds a
  block-diagonal causal mask.

The LM head then runs only at positions whose next token is a completion token:

    log π(y | x) = Σ_{t ∈ completion} log softmax(W h_{t-1})[y_t]

The result equals the padded forward's up to float rounding (tests/test_packing.py; and
tests/test_dpo_loss.py through TRL's loss). Used for plain (or PEFT-wrapped) decoder-only causal LMs; anything else — FSDP2-sharded
models, logit soft-capping or scaling — takes the padded path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from lit_align.losses.logps import token_logps
from lit_align.models import is_fsdp_sharded, takes_logits_to_keep, unwrap_peft


@dataclass
class Packing:
    """Where each real token of a right-padded [N, T] batch sits in the packed [R, W] batch."""

    src: Tensor  # flat indices into [N * T] of the real tokens
    dst: Tensor  # their flat indices into [R * W] (a shared prompt's two copies map to one place)
    padded_shape: tuple[int, int]
    packed_shape: tuple[int, int]
    position_ids: Tensor  # [R, W]: each token's position within its own sequence
    attention_mask: Optional[Tensor] = None  # a 4-D mask [R, 1, W, W], or None: derived from position_ids

    def pack(self, values: Tensor, fill: int = 0) -> Tensor:
        """[N, T] -> [R, W] (gaps filled with `fill`)."""
        out = values.new_full((self.packed_shape[0] * self.packed_shape[1],), fill)
        out[self.dst] = values.reshape(-1)[self.src]
        return out.view(self.packed_shape)

    def unpack(self, values: Tensor) -> Tensor:
        """[R, W, ...] -> [N, T, ...] (padding positions are zero)."""
        rest = values.shape[2:]
        out = values.new_zeros((self.padded_shape[0] * self.padded_shape[1], *rest))
        out[self.src] = values.reshape(-1, *rest)[self.dst]
        return out.view(*self.padded_shape, *rest)

    @classmethod
    def from_pieces(cls, src: list[Tensor], dst: list[Tensor], padded_shape, packed_shape, position_ids: Tensor, device,
                    attention_mask: Optional[Tensor] = None) -> "Packing":  # fmt: skip
        """The plan from its per-sequence index pieces (built on the CPU), moved to `device`."""
        src_t, dst_t = torch.cat(src).to(device), torch.cat(dst).to(device)
        return cls(src_t, dst_t, padded_shape, packed_shape, position_ids.to(device), attention_mask)

    def packed_index(self) -> Tensor:
        """[N * T]: the flat packed position of each padded token (i, t) at i * T + t; -1 for padding."""
        out = torch.full((self.padded_shape[0] * self.padded_shape[1],), -1, dtype=torch.long, device=self.src.device)
        out[self.src] = self.dst
        return out


def plan_packing(attention_mask: Tensor) -> Packing:
    """First-fit-decreasing packing of right-padded rows into rows of the same width T."""
    n, width = attention_mask.shape
    lengths_t = attention_mask.sum(-1)
    if not torch.equal(attention_mask.bool(), torch.arange(width, device=attention_mask.device) < lengths_t[:, None]):
        raise ValueError("packing needs right-padded rows (every row's real tokens first)")
    lengths = lengths_t.tolist()
    free: list[int] = []  # room left in each packed row
    place: list[tuple[int, int]] = [(0, 0)] * n  # (packed row, offset) per sequence
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            free.append(width)
            row = len(free) - 1
        place[i] = (row, width - free[row])
        free[row] -= lengths[i]
    rows = max(1, len(free))
    positions = torch.arange(width).repeat(rows, 1)  # gaps at row ends count on as their own "sequence"
    src, dst = [], []
    for i, (row, offset) in enumerate(place):
        src.append(torch.arange(lengths[i]) + i * width)
        dst.append(torch.arange(lengths[i]) + row * width + offset)
        positions[row, offset : offset + lengths[i]] = torch.arange(lengths[i])
    return Packing.from_pieces(src, dst, (n, width), (rows, width), positions, attention_mask.device)


SEGMENT_PAD, SEGMENT_PROMPT, SEGMENT_CHOSEN, SEGMENT_REJECTED = 0, 1, 2, 3


def plan_shared_prompt(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, attn_implementation: Optional[str], dtype=None
) -> Optional[Packing]:
    """One `prompt ⊕ chosen ⊕ rejected` row per pair of a [chosen; rejected] batch, or None when
    the halves do not share their prompts or the attention implementation takes no 4-D mask."""
    if attn_implementation not in ("sdpa", "eager") or input_ids.shape[0] % 2:
        return None
    n, width = attention_mask.shape
    b, device = n // 2, input_ids.device
    lengths = attention_mask.sum(-1)
    prompt = (attention_mask.bool() & ~completion_mask.bool()).sum(-1)
    positions = torch.arange(width, device=device)
    layout = (positions < prompt[:, None]) | ((positions < lengths[:, None]) & completion_mask.bool())
    if not torch.equal(prompt[:b], prompt[b:]) or not torch.equal(layout, positions < lengths[:, None]):
        return None  # not (prompt, then completion) rows with equal prompts per pair
    if not torch.equal(input_ids[:b] * (positions < prompt[:b, None]), input_ids[b:] * (positions < prompt[b:, None])):
        return None
    p, c, r = prompt[:b].tolist(), (lengths[:b] - prompt[:b]).tolist(), (lengths[b:] - prompt[b:]).tolist()
    row_width = max(pi + ci + ri for pi, ci, ri in zip(p, c, r))
    position_ids = torch.zeros(b, row_width, dtype=torch.long)
    segment = torch.zeros(b, row_width, dtype=torch.long)
    src, dst = [], []
    for i in range(b):
        pc, pcr = p[i] + c[i], p[i] + c[i] + r[i]
        src += [torch.arange(pc) + i * width, torch.arange(p[i]) + (b + i) * width, torch.arange(p[i], p[i] + r[i]) + (b + i) * width]
        dst += [torch.arange(pc) + i * row_width, torch.arange(p[i]) + i * row_width, torch.arange(pc, pcr) + i * row_width]
        position_ids[i, :pc] = torch.arange(pc)
        position_ids[i, pc:pcr] = torch.arange(p[i], p[i] + r[i])
        segment[i, : p[i]], segment[i, p[i] : pc], segment[i, pc:pcr] = SEGMENT_PROMPT, SEGMENT_CHOSEN, SEGMENT_REJECTED
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(row_width, row_width, dtype=torch.bool).tril()
    mask = causal & (k != SEGMENT_PAD) & ~((q == SEGMENT_REJECTED) & (k == SEGMENT_CHOSEN))
    mask |= torch.eye(row_width, dtype=torch.bool)  # padding queries attend to themselves: no empty softmax
    mask = mask[:, None].to(device)
    if attn_implementation == "eager":  # eager attention adds the mask to its scores
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return Packing.from_pieces(src, dst, (n, width), (b, row_width), position_ids, device, attention_mask=mask)


class UnpackedHiddenStates(Sequence):
    """HF-style `hidden_states` in the padded layout, unpacked only for the layers asked for."""

    def __init__(self, packed: Sequence[Tensor], packing: Packing):
        self.packed, self.packing = packed, packing

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, layer: int) -> Tensor:
        return self.packing.unpack(self.packed[layer])


def supports_packing(model) -> bool:
    """A decoder-only HF causal LM whose logits are just `lm_head(h)` (no soft-capping or scaling)."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if not takes_logits_to_keep(base):
        return False
    if type(base).__module__.split(".")[-1] in ("modeling_gemma2", "modeling_gemma3", "modeling_cohere", "modeling_granite"):
        return False  # these scale or soft-cap their logits
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    if is_fsdp_sharded(base):
        return False
    return base.get_output_embeddings() is not None


def plan(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, model, share_prompt: bool = True
) -> Packing:
    """The padding-free layout of a right-padded batch for `model`: each pair's prompt once when the
    batch's [chosen; rejected] halves share prompts (and `share_prompt`), else dense packing."""
    packing = None
    if share_prompt:
        dtype = next(model.parameters()).dtype
        packing = plan_shared_prompt(input_ids, attention_mask, completion_mask, model.config._attn_implementation, dtype)
    return packing or plan_packing(attention_mask)


def packed_sequence_logps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    output_hidden_states: bool = False,
    share_prompt: bool = True,
) -> tuple[Tensor, Optional[Sequence[Tensor]]]:
    """Summed completion log-probs [N] of right-padded rows, computed padding-free (see module doc).

    With `share_prompt`, a [chosen; rejected] batch whose halves share prompts takes the shared-prompt
    layout; anything else is packed."""
    base = unwrap_peft(model)
    packing = plan(input_ids, attention_mask, completion_mask, base, share_prompt)
    # The model's own forward (hooks, adapters), asked for no logits; hidden_states[-1] is the final-norm output.
    out = model(
        input_ids=packing.pack(input_ids),
        position_ids=packing.position_ids,
        attention_mask=packing.attention_mask,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
    )
    hidden = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])
    n, width = attention_mask.shape
    # targets: completion tokens at t >= 1; their logits come from position t - 1 of the same sequence
    target = completion_mask.bool() & attention_mask.bool()
    target[:, 0] = False
    seq, t = target.nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(hidden[packing.packed_index()[seq * width + t - 1]])
    per_token = token_logps(logits, input_ids[seq, t])
    logps = per_token.new_zeros(n).index_add(0, seq, per_token)
    hidden_states = UnpackedHiddenStates(out.hidden_states, packing) if output_hidden_states else None
    return logps, hidden_states
