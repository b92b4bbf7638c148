"""`lit-align export`: a Lightning checkpoint to a Hugging Face model directory.

Reads either checkpoint form Lightning writes:

- a full `.ckpt` file (DDP, single device, or FSDP/ModelParallel with full state dicts);
- a sharded checkpoint directory (ModelParallelStrategy / FSDPStrategy with sharded state):
  torch.distributed.checkpoint (DCP) shards plus `meta.pt`. Only the exported model's tensors
  are read from it (DCP loads by key, without a process group), so optimiser state and
  reference models are never materialised.

The model is rebuilt from the `PolicyConfig` saved in the checkpoint's hyper-parameters
(`base_model` overrides its location), its weights are replaced by the checkpoint's, and it is
saved with `save_pretrained`: LoRA merged into the base weights, or as a peft adapter directory.
Reward models are rebuilt as their RewardModule and written by its own `export`
(a sequence-classification directory).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from lit_align.models import LoraArgs, PolicyConfig, export_hf, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

META_FILE = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint directory
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# ---------------------------------------------------------------------------- reading checkpoints
def is_sharded_checkpoint(path: Path) -> bool:
    """A sharded (distributed) checkpoint: a directory with Lightning's metadata file."""
    return path.is_dir() and (path / META_FILE).is_file()


def read_metadata(path: Path) -> dict:
    """Hyper-parameters etc. Checkpoints are pickles: only export checkpoints you trust."""
    if is_sharded_checkpoint(path):
        return torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    if path.is_file():
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    raise FileNotFoundError(f"{path}: neither a .ckpt file nor a sharded checkpoint directory with {META_FILE}")


def sharded_keys(path: Path) -> tuple[str, dict[str, str]]:
    """(top-level key, {model parameter name: DCP storage key}) of a DCP directory."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    mappings = metadata.planner_data or {}
    paths = {key: tuple(mappings.get(key, key.split(".", 1))) for key in metadata.state_dict_metadata}
    for top in ("state_dict", "model"):  # ModelParallelStrategy, FSDPStrategy
        names = {p[1]: key for key, p in paths.items() if len(p) == 2 and p[0] == top}
        if names:
            return top, names
    raise ValueError(f"{path}: no 'state_dict' or 'model' entries in the sharded checkpoint")


def clean(key: str) -> str:
    for wrapper in WRAPPER_PREFIXES:
        key = key.replace(wrapper, "")
    return key


def find_prefix(model_keys: list[str], ckpt_keys: list[str], model_attr: Optional[str], path: Path) -> str:
    """The LightningModule attribute prefix (e.g. "policy.") under which all model keys appear."""
    ckpt = {clean(k) for k in ckpt_keys}
    if model_attr is not None:
        candidates = [model_attr.rstrip(".") + "." if model_attr else ""]
    else:
        anchor = max(model_keys, key=len)  # a long, distinctive key (LoRA keys when present)
        candidates = sorted({k[: len(k) - len(anchor)] for k in ckpt if k.endswith(anchor)})
    matching = [p for p in candidates if all(p + k in ckpt for k in model_keys)]
    if len(matching) > 1 and "policy." in matching:
        matching = ["policy."]
    if len(matching) == 1:
        return matching[0]
    missing = [k for k in model_keys if candidates and candidates[0] + k not in ckpt][:5]
    raise ValueError(
        f"{path}: cannot tell which weights to export (prefixes matching the model: {matching or 'none'}; "
        f"tried {candidates or 'none'}, first missing keys {missing}). Pass --model_attr (e.g. policy)."
    )


def find_policy_config(hparams: dict, path: Path) -> PolicyConfig:
    """The PolicyConfig in the checkpoint's hyper-parameters (key "policy" preferred)."""
    found = {k: v for k, v in hparams.items() if _as_policy(v) is not None}
    if not found:
        raise ValueError(
            f"{path}: no PolicyConfig among the saved hyper-parameters {sorted(hparams)}; "
            "pass --base_model with the model the run started from"
        )
    key = "policy" if "policy" in found else sorted(found)[0]
    return _as_policy(found[key])


def _as_policy(value: Any) -> Optional[PolicyConfig]:
    if dataclasses.is_dataclass(value) and hasattr(value, "name_or_path"):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if not (isinstance(value, dict) and "name_or_path" in value):
        return None  # LightningCLI stores dataclass arguments as plain dicts
    names = {f.name for f in dataclasses.fields(PolicyConfig)}
    cfg = PolicyConfig(**{k: v for k, v in value.items() if k in names})
    if cfg.lora is not None and not isinstance(cfg.lora, LoraArgs):
        lora = cfg.lora if isinstance(cfg.lora, dict) else dataclasses.asdict(cfg.lora)
        cfg.lora = LoraArgs(**lora)
    return cfg


def load_weights(path: Path, meta: dict, model_keys: list[str], model_attr: Optional[str]) -> dict[str, torch.Tensor]:
    """The model's tensors (keys without prefix) from a full or sharded checkpoint.

    Lean checkpoints (lit_align's AlignModule drops frozen weights from full checkpoints and
    lists them under `lit_align_frozen_keys`) give only the trained tensors; the frozen ones
    stay as loaded from the base model.
    """
    frozen = set(meta.get("lit_align_frozen_keys") or [])
    if not is_sharded_checkpoint(path):
        state = meta["state_dict"]
        names = list(state)
    else:
        top, storage_keys = sharded_keys(path)
        names = list(storage_keys)
    by_clean = {clean(k): k for k in [*names, *frozen]}
    prefix = find_prefix(model_keys, list(by_clean), model_attr, path)
    stored = {k: by_clean[prefix + k] for k in model_keys if by_clean[prefix + k] not in frozen}
    if not is_sharded_checkpoint(path):
        return {k: state[name] for k, name in stored.items()}

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    read = {}
    for name in stored.values():
        info = metadata.state_dict_metadata[storage_keys[name]]
        read[name] = torch.empty(info.size, dtype=info.properties.dtype)
    dcp.load({top: read}, checkpoint_id=str(path))  # no process group: reads every shard locally
    return {k: read[name] for k, name in stored.items()}


def check_shapes(path: Path, weights: dict, target: dict) -> None:
    for key, tensor in weights.items():
        if tensor.shape != target[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(target[key].shape)}")


def export_with_module(path: Path, meta: dict, module_path: str, out_dir: str, overrides: dict) -> Path:
    """Rebuild the LightningModule from its hyper-parameters, load its weights, call its `export`.

    For modules whose export is more than `save_pretrained` of a causal LM (RewardModule: a
    sequence-classification head, or a last-token head turned into one).
    """
    import importlib

    module_name, _, class_name = module_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    hparams = dict(meta.get("hyper_parameters") or {})
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: (_as_policy(v) or v) for k, v in hparams.items() if k in params}
    for key, value in kwargs.items():
        if isinstance(value, PolicyConfig):
            kwargs[key] = dataclasses.replace(value, gradient_checkpointing=False, **overrides)
    module = cls(**kwargs)
    module.configure_model()
    target = module.state_dict()
    weights = load_weights(path, meta, list(target), model_attr="")
    check_shapes(path, weights, target)
    module.load_state_dict(weights, strict=False)  # keys not in `weights` are frozen base weights
    module.eval()
    return Path(module.export(out_dir))


# name of the model's config in the hyper-parameters -> the module that knows how to export it
MODULE_EXPORTERS = {"backbone": "lit_align.modules.reward.RewardModule"}


# ---------------------------------------------------------------------------- the command
def export(
    checkpoint: str,
    out_dir: str,
    merge_lora: bool = True,
    model_attr: Optional[str] = None,
    base_model: Optional[str] = None,
    dtype: Optional[str] = None,
    module: Optional[str] = None,
) -> Path:
    """Export a Lightning checkpoint (full .ckpt file or sharded directory) to a Hugging Face directory.

    Args:
        checkpoint: A `.ckpt` file or a sharded checkpoint directory (ModelParallelStrategy / FSDP).
        out_dir: Where to write the model (`AutoModelForCausalLM.from_pretrained(out_dir)` loads it).
        merge_lora: Merge a LoRA adapter into the base weights; False writes a peft adapter directory.
        model_attr: The LightningModule attribute holding the model (e.g. "policy"); found automatically if None.
        base_model: Load the architecture/tokenizer from here instead of the checkpoint's `policy.name_or_path`.
        dtype: Save in this dtype (float32, bfloat16, float16) instead of the training dtype.
        module: Rebuild this LightningModule class (import path) and call its `export`; by default
            reward models (a `backbone` hyper-parameter) go through RewardModule, policies are
            exported directly as causal LMs.
    """
    path = Path(checkpoint)
    meta = read_metadata(path)
    hparams = meta.get("hyper_parameters") or {}
    module = module or next((m for key, m in MODULE_EXPORTERS.items() if key in hparams), None)
    if module is not None:
        if not merge_lora:
            raise ValueError(f"{module} exports merged weights only; drop --merge_lora false")
        overrides = {k: v for k, v in {"name_or_path": base_model, "dtype": dtype}.items() if v is not None}
        out = export_with_module(path, meta, module, out_dir, overrides)
        log.info("Exported %s through %s to %s", path, module, out)
        return out
    cfg = find_policy_config(hparams, path)
    if base_model is not None:
        cfg = dataclasses.replace(cfg, name_or_path=base_model)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=False)
    model = load_causal_lm(cfg, with_lora=True)
    target = model.state_dict()
    weights = load_weights(path, meta, list(target), model_attr)
    check_shapes(path, weights, target)
    model.load_state_dict(weights, strict=False)  # keys not in `weights` are frozen base weights
    model.eval()
    out = export_hf(model, load_tokenizer(cfg), out_dir, merge_lora=merge_lora)
    log.info("Exported %s (%s) to %s", path, "sharded" if is_sharded_checkpoint(path) else "full", out)
    return out


export_checkpoint = export  # the name `from lit_align import export_checkpoint` gives it
