"""Stand-ins for a model's linear layers while it generates (never while it trains):

* `ChunkedHead`: a float32 LM head computed in column blocks, the same logits (the decode loop's
  default, `lit_align.generation.decoder.Decoder`);
* `Int8Linear` / `int8_for_generation`: int8 weights and activations (opt-in, Python only; the
  samples change: docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

HEAD_CHUNK = 1024  # LM-head output columns per matmul (measured on SmolLM2: 1024 and 512 alike, 4096+ slower)


class ChunkedHead(torch.nn.Module):
    """A float32 LM head (`nn.Linear`) computed HEAD_CHUNK output columns at a time, into one logits
    tensor: each logit is the same dot product over the same hidden vector, so the values equal the
    head's own (tests/test_sampling_head.py). On a CPU the one matmul over SmolLM2's 49k vocabulary
    takes 1.3-1.4x the time of its blocks at 4-32 rows, whose outputs stay in cache
    (docs/benchmarks.md); one row is left to the head (a matrix-vector product, faster whole)."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.head.weight, self.head.bias
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) < 2:
            return self.head(x)
        out = rows.new_empty(len(rows), len(weight))
        for start in range(0, len(weight), HEAD_CHUNK):
            part = slice(start, start + HEAD_CHUNK)
            if bias is None:
                torch.mm(rows, weight[part].t(), out=out[:, part])
            else:
                torch.addmm(bias[part], rows, weight[part].t(), out=out[:, part])
        return out.view(*x.shape[:-1], len(weight))


def chunkable_head(model) -> Optional[torch.nn.Linear]:
    """`model`'s LM head when `ChunkedHead` may stand in for it: a plain float32 `nn.Linear` on the
    CPU, wider than one block, without hooks of its own (which the stand-in would skip); else None."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        return None
    if head.out_features <= HEAD_CHUNK:
        return None  # one block: the head itself, without the stand-in's Python
    hooked = head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook")
    return None if hooked else head


class Int8Linear(torch.nn.Module):
    """A generation-only stand-in for `nn.Linear` on int8 weights and activations:

        y = (round(x / s_x) · round(W / s_w)ᵀ) · s_x · s_wᵀ + b,   s_w = max|W_j·| / 127,  s_x = max|x_i·| / 127

    one scale per output channel of W (computed once) and per row of x (at every call, so a row's
    output does not depend on the other rows), products summed exactly in int32 (`torch._int_mm`)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.register_buffer("weight_scale", weight.abs().amax(1).clamp(min=1e-12) / 127)
        self.register_buffer("weight_t", (weight / self.weight_scale[:, None]).round_().to(torch.int8).t().contiguous())
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
