"""What a training run costs: wall-clock seconds and the tokens its models forwarded.

`CostMeter` is a Callback. At `on_fit_start` it hooks the forward of every Hugging Face model
the LightningModule holds (`policy`, `reference`, reward models) and counts the positions each call
forwards, `input_ids.numel()` (padding included: it is computed too). A call with a KV cache is
sampling (prefill and decode steps); any other is a full forward, split by whether autograd
records it (the trained forward, whose backward costs about twice more) or not (reference
log-probs, scoring). Calls during validation and the sanity check are not counted, and the
seconds are those of the fit from `on_fit_start` to `on_train_end` minus validation: model
loading before and the export after are left out.

Modules that sample report the tokens they generated in an integer attribute `generated_tokens`
(OnlineDPOModule); the meter copies it. A module that samples through a `sample` method (GRPOModule)
has that method wrapped for the fit: the calls made inside it are the sampling, every other call
is a full forward even when it passes a KV cache (GRPO's shared-prompt log-probs do), and, when
the module keeps no `generated_tokens`, the meter adds up the completion tokens (up to and
including EOS, the returned `completion_mask`) of every training call.

Reward models count as the module's own models do, and also separately: `reward_forward_tokens`
(positions) and `reward_forward_texts` (texts scored) of every model found inside `reward_funcs`,
also in sources that are plain objects holding models (`ShadowRewardEnsemble` -> its
`SequenceClassifierReward`s -> their Hugging Face models).
"""

from __future__ import annotations

import json
import os
import time
import types
from collections import Counter
from pathlib import Path
from typing import Optional

import lightning as L
import torch


def load_average() -> list[float]:
    """The machine's 1-, 5- and 15-minute load averages (timings mean little without them)."""
    return [round(x, 2) for x in os.getloadavg()]


def call_positions(args: tuple, kwargs: dict) -> tuple[int, bool]:
    """(positions forwarded, whether the call uses a KV cache) of one model call."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None and kwargs.get("inputs_embeds") is not None:
        ids = kwargs["inputs_embeds"][..., 0]
    positions = int(ids.numel()) if torch.is_tensor(ids) else 0
    cached = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
    return positions, cached


def call_rows(args: tuple, kwargs: dict) -> int:
    """Sequences (texts) one model call forwards."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None and kwargs.get("inputs_embeds") is not None:
        ids = kwargs["inputs_embeds"][..., 0]
    return int(ids.shape[0]) if torch.is_tensor(ids) and ids.dim() > 1 else int(torch.is_tensor(ids))


def is_hf_model(module) -> bool:
    return isinstance(module, torch.nn.Module) and hasattr(module, "config") and hasattr(module, "get_input_embeddings")


def top_hf_models(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Module]:
    """The outermost Hugging Face models in `module`'s tree (a model's own sub-models not again)."""
    found = {}
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        found.update({path: child} if is_hf_model(child) else top_hf_models(child, f"{path}."))
    return found


_LEAVES = (str, bytes, int, float, bool, type(None), torch.Tensor, types.FunctionType, types.MethodType, types.ModuleType, type)


def held_models(obj, prefix: str, seen: set[int], depth: int = 4) -> dict[str, torch.nn.Module]:
    """The outermost Hugging Face models reachable from `obj` through modules, attributes, dicts
    and lists (a reward source that is a plain object holding models), by attribute path. Each
    model once: one whose id is in `seen` (already watched, e.g. the policy a ProbeReward reads)
    is skipped, and every model returned is added to `seen`."""
    if isinstance(obj, torch.nn.Module):
        candidates = {prefix: obj} if is_hf_model(obj) else top_hf_models(obj, f"{prefix}.")
        found = {name: m for name, m in candidates.items() if id(m) not in seen}
        seen.update(id(m) for m in found.values())
        return found
    if depth == 0 or isinstance(obj, _LEAVES) or type(obj).__module__.split(".")[0] in ("transformers", "tokenizers"):
        return {}  # tokenizers and the like hold no model worth walking into
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return {}
    found: dict[str, torch.nn.Module] = {}
    for key, value in items:
        found.update(held_models(value, f"{prefix}.{key}", seen, depth - 1))
    return found


def watched_models(pl_module) -> dict[str, torch.nn.Module]:
    """The models a module forwards: its own (`policy`, `reference`, ...) and those inside its
    reward functions, whether a source is a model, a module holding models, or a plain object
    holding them (a shadow-model ensemble); each model once."""
    found = top_hf_models(pl_module)
    seen = {id(m) for m in found.values()}
    for i, source in enumerate(getattr(pl_module, "reward_funcs", None) or []):
        found.update(held_models(source, f"reward_funcs.{i}", seen))
    return found


class CostMeter(L.Callback):
    """Counts the positions the module's models forward and times the fit (see the module docstring).

    Args:
        models: Attribute names of the LightningModule's models to count; null: every Hugging Face
            model it holds (outermost ones: `policy`, `reference`, ...) and those inside its
            `reward_funcs` that are modules.
        out: Write the summary as JSON here at the end of the fit.
    """

    def __init__(self, models: Optional[list[str]] = None, out: Optional[str] = None):
        self.models, self.out = models, out
        self.counts: Counter = Counter()
        self.rows: Counter = Counter()
        self.generated = 0  # tokens sampled through a wrapped `sample` (modules without `generated_tokens`)
        self.seconds = 0.0
        self.validation_seconds = 0.0
        self._start: Optional[float] = None
        self._validation_start: Optional[float] = None
        self._handles: list = []
        self._wrapped = None
        self._sampling = False
        self._trainer = None
        self.summary: dict = {}

    # ---------------------------------------------------------------- hooks on the models
    def _watched(self, pl_module) -> dict[str, torch.nn.Module]:
        if self.models is None:
            return watched_models(pl_module)
        missing = [name for name in self.models if not isinstance(getattr(pl_module, name, None), torch.nn.Module)]
        if missing:
            raise ValueError(f"CostMeter: {type(pl_module).__name__} has no model attribute(s) {missing}")
        return {name: getattr(pl_module, name) for name in self.models}

    def _counter(self, name: str):
        def hook(module, args, kwargs):
            trainer = self._trainer
            if trainer is not None and (trainer.sanity_checking or trainer.validating):
                return
            positions, cached = call_positions(args, kwargs)
            sampling = self._sampling if self._wrapped is not None else cached  # a wrapped `sample` delimits it
            kind = "sampling" if sampling else ("forward_grad" if torch.is_grad_enabled() else "forward_nograd")
            self.counts[f"{name}/{kind}"] += positions
            self.rows[f"{name}/{kind}"] += call_rows(args, kwargs)

        return hook

    def _count_samples(self, pl_module) -> None:
        """Wrap `pl_module.sample` (an instance attribute, removed at fit end): the model calls inside
        it are sampling, and the tokens it returns are counted when the module keeps no
        `generated_tokens` count itself."""
        original = getattr(pl_module, "sample", None)
        if not callable(original) or "sample" in vars(pl_module):
            return
        own_count = hasattr(pl_module, "generated_tokens")

        def sample(*args, **kwargs):
            self._sampling = True
            try:
                out = original(*args, **kwargs)
            finally:
                self._sampling = False
            trainer = self._trainer
            mask = getattr(out, "completion_mask", None)
            if not own_count and torch.is_tensor(mask) and not (trainer is not None and (trainer.sanity_checking or trainer.validating)):
                self.generated += int(mask.sum())
            return out

        pl_module.sample = sample
        self._wrapped = pl_module

    def on_fit_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        for name, model in self._watched(pl_module).items():
            self._handles.append(model.register_forward_pre_hook(self._counter(name), with_kwargs=True))
        self._count_samples(pl_module)
        self._start = time.perf_counter()

    # ---------------------------------------------------------------- timing
    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validation_start is not None:
            self.validation_seconds += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start - self.validation_seconds
            self._start = None
        self.summary = self.summarize(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._wrapped is not None:
            del self._wrapped.sample  # the class's method again
            self._wrapped = None
        if self.out is not None and trainer.is_global_zero:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(self.summary, indent=2))

    def summarize(self, trainer, pl_module) -> dict:
        """Totals: seconds, steps, forward / sampling positions, generated tokens, reward-model
        forwards, and per model (positions in `by_model`, texts in `by_model_texts`)."""
        by_kind = Counter()
        for key, n in self.counts.items():
            by_kind[key.split("/")[1]] += n
        generated = getattr(pl_module, "generated_tokens", None)
        generated = self.generated if generated is None else generated
        reward = lambda counter: sum(n for key, n in counter.items() if key.startswith("reward_funcs."))  # noqa: E731
        return {
            "train_seconds": round(self.seconds, 2),
            "validation_seconds": round(self.validation_seconds, 2),
            "steps": int(trainer.global_step),
            "forward_tokens": by_kind["forward_grad"] + by_kind["forward_nograd"],
            "forward_tokens_grad": by_kind["forward_grad"],
            "sampling_forward_tokens": by_kind["sampling"],
            "generated_tokens": int(generated),
            "reward_forward_tokens": reward(self.counts),
            "reward_forward_texts": reward(self.rows),
            "by_model": dict(sorted(self.counts.items())),
            "by_model_texts": dict(sorted(self.rows.items())),
        }

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        elapsed = time.perf_counter() - self._start - self.validation_seconds if self._start is not None else 0.0
        return {"counts": dict(self.counts), "rows": dict(self.rows), "generated": self.generated, "seconds": self.seconds + elapsed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.counts = Counter(state_dict.get("counts", {}))
        self.rows = Counter(state_dict.get("rows", {}))
        self.generated = int(state_dict.get("generated", 0))
        self.seconds = float(state_dict.get("seconds", 0.0))


__all__ = ["CostMeter", "call_positions", "call_rows", "held_models", "load_average", "watched_models"]
