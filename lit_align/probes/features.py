"""Hidden-state features for probes: selection, batched extraction, and a disk cache.

`select_features` is the one function DPOModule and probe training share: it pools the
hidden states of chosen layers into `[B, len(layers), H]`. `cached_features` runs a frozen
backbone over token-id sequences once and stores the result under a fingerprint of
(model weights, token ids, layers, pooling), so a second run with the same inputs reuses it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FEATURES_VERSION = 1  # bump when extraction changes meaning, to invalidate old caches


def resolve_layers(layers: Optional[Sequence[int]], num_layers: int) -> list[int]:
    """Layer indices into HF `hidden_states` (1..L; 0 is the embedding output).

    None means every transformer layer 1..L; negative indices count from the end (−1 = L).
    """
    if layers is None:
        return list(range(1, num_layers + 1))
    out = []
    for layer in layers:
        index = num_layers + 1 + layer if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {num_layers} layers (use 1..{num_layers})")
        out.append(index)
    return out


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of the last non-padding token of each row [B]; right or left padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def select_features(
    hidden_states: Sequence[Tensor], attention_mask: Tensor, layers: list[int], pooling: str = "last"
) -> Tensor:
    """Pool `hidden_states` (HF `output_hidden_states=True`, index 0 = embeddings) to
    `[B, len(layers), H]`: `last` = hidden state at the last non-padding token, `mean` =
    mean over non-padding tokens."""
    if max(layers) >= len(hidden_states) or min(layers) < 0:
        raise ValueError(f"layers {layers} out of range: the model returned {len(hidden_states)} hidden states")
    stacked = torch.stack([hidden_states[l] for l in layers], dim=1)  # [B, n, T, H]
    if pooling == "last":
        index = last_token_index(attention_mask)
        rows = torch.arange(stacked.shape[0], device=stacked.device)
        return stacked[rows, :, index]
    if pooling == "mean":
        mask = attention_mask.to(stacked.dtype)[:, None, :, None]
        return (stacked * mask).sum(2) / mask.sum(2).clamp(min=1)
    raise ValueError(f"pooling={pooling!r}: choose 'last' or 'mean'")


def num_hidden_layers(model) -> int:
    config = model.config
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


# ---------------------------------------------------------------------------- tokenization
def encode_texts(
    tokenizer, prompts: Sequence, responses: Optional[Sequence[Optional[str]]] = None, max_length: Optional[int] = None
) -> list[list[int]]:
    """Token ids of (prompt, response) texts as every module renders them: the chat-templated
    prompt, then the response and EOS. Without a response the text ends at the assistant
    header (the state in which the model decides whether to refuse). Over-long texts keep their
    last `max_length` tokens, because the probe reads the end."""
    from lit_align.data.render import encode_prompt, encode_response

    responses = responses if responses is not None else [None] * len(prompts)
    if len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    out = []
    for prompt, response in zip(prompts, responses):
        ids = encode_prompt(tokenizer, prompt)
        if response is not None:
            ids = ids + encode_response(tokenizer, response)
        out.append(ids[-max_length:] if max_length else ids)
    return out


# ---------------------------------------------------------------------------- extraction
def _skip_lm_head(model) -> dict:
    """Ask for logits at one position only: the LM head over every token is wasted work here."""
    from lit_align.models import takes_logits_to_keep

    return {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}


@torch.no_grad()
def extract_features(
    model,
    input_ids: Sequence[Sequence[int]],
    layers: list[int],
    pooling: str = "last",
    batch_size: int = 16,
    pad_token_id: int = 0,
    progress: bool = True,
    desc: str = "features",
) -> Tensor:
    """Features `[N, len(layers), H]` (float32, CPU) from a frozen `model`, in input order.

    Sequences are batched longest-first to keep padding small."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    extra = _skip_lm_head(model)
    chunks: list[Tensor] = []
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            rows = [list(input_ids[i]) for i in order[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False, **extra)
            chunks.append(select_features(out.hidden_states, mask.to(device), layers, pooling).float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("extract_features got no input sequences")
    features = torch.cat(chunks)
    return features[torch.argsort(torch.tensor(order))]


# ---------------------------------------------------------------------------- cache
def parameters_fingerprint(model, sample: int = 4096) -> str:
    """A cheap fingerprint of a model in memory: its config plus a strided sample of every parameter
    (`lit_align.modules.refcache.model_fingerprint` fingerprints a model's files instead).

    Any training step changes the sampled values, so fine-tuned weights get a new fingerprint
    without hashing hundreds of megabytes."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def features_fingerprint(model_fp: str, input_ids: Sequence[Sequence[int]], layers: list[int], pooling: str) -> str:
    h = hashlib.sha256(json.dumps({"v": FEATURES_VERSION, "model": model_fp, "layers": layers, "pooling": pooling}).encode())
    for ids in input_ids:
        h.update(json.dumps(list(ids)).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    from lit_align.models import cache_root

    return cache_root() / "features"


def cached_features(
    model,
    input_ids: Sequence[Sequence[int]],
    layers: list[int],
    pooling: str = "last",
    *,
    cache_dir: Optional[str | Path] = None,
    **extract_options: Any,
) -> tuple[Tensor, bool]:
    """`(features, reused)`: features from `cache_dir` when the fingerprint of (model, input_ids,
    layers, pooling) matches, else extracted with `extract_features` and stored. `cache_dir=None`
    uses the lit_align cache. `extract_options` go to `extract_features` (batch_size,
    pad_token_id, progress, desc) and are not part of the cache key."""
    from safetensors.torch import load_file, save_file

    # a misspelt option fails on a cache hit too, not only when extracting
    inspect.signature(extract_features).bind(model, input_ids, layers, pooling, **extract_options)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = features_fingerprint(parameters_fingerprint(model), input_ids, layers, pooling)
    path = cache / f"{key}.safetensors"
    if path.is_file():
        log.info("reusing cached features %s", path)
        return load_file(str(path))["features"], True
    features = extract_features(model, input_ids, layers, pooling, **extract_options)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks may extract at the same time
    meta = {"layers": json.dumps(layers), "pooling": pooling, "rows": str(len(input_ids))}
    save_file({"features": features.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)
    log.info("cached features for %d texts at %s", len(input_ids), path)
    return features, False


__all__ = [
    "cached_features",
    "encode_texts",
    "extract_features",
    "last_token_index",
    "parameters_fingerprint",
    "resolve_layers",
    "select_features",
]
