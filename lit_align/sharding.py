"""Sharding Hugging Face models with FSDP2 inside Lightning's ModelParallelStrategy.

Modules load their models in `configure_model()` and pass each through `AlignModule.shard_model(model)`,
which, when the strategy provides a device mesh, calls `apply_sharding(model, mesh, **options)` with
the strategy's options (`FSDP2Strategy`'s `ShardingConfig`, overridable per module class): a frozen
model (a reference) goes to `prepare_reference` (sharded or replicated), a trained one to
`shard_model`. FSDP2 (`torch.distributed.fsdp.fully_shard`) turns every parameter into a DTensor sharded
on dim 0 over the data-parallel ranks; a *unit* is a group of parameters all-gathered together
before its forward and freed after. Units here are:

    one per decoder block            (found generically: `_no_split_modules` or the layers ModuleList)
    one per block's LoRA adapters    (trainable and frozen parameters never share a unit)
    one for trainable leaves outside the blocks, next to frozen ones (a LoRA reward model's head)
    the root                         (embeddings, final norm, LM head, whatever is left)

Parameter memory per rank is then ~ (all parameters) / world + (the largest units, gathered);
docs/scaling.md has the full budget.

Also here: `FSDP2Strategy` (ModelParallelStrategy that shards over every process by default),
`CudaFSDPStrategy` (Lightning's FSDPStrategy with a clear error on CPU), `DecoderBlockWrapPolicy`
(the same units for FSDP1's auto-wrap) and `gathered_parameters` (full weights for `generate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lit_align.models import unwrap_peft

log = logging.getLogger(__name__)

_MP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
MixedPrecision = Literal["auto", "bf16", "bfloat16", "fp16", "float16"]


@dataclass
class ShardingConfig:
    """How `configure_model` shards models under ModelParallelStrategy (ignored otherwise)."""

    reshard_after_forward: bool = True
    """Free gathered block weights after forward (ZeRO-3); False keeps them until backward (ZeRO-2, faster, more memory)."""
    mixed_precision: Optional[MixedPrecision] = "auto"
    """"auto": bf16 compute with fp32 gradient reduction on CUDA, none on CPU; "bf16", "fp16" or None (fp32)."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in backward."""
    reference: Literal["shard", "replicate"] = "shard"
    """Frozen reference models: shard like the policy, or keep a full copy on every rank."""


# Modules save this in hyper-parameters; resuming loads checkpoints with weights_only=True.
torch.serialization.add_safe_globals([ShardingConfig])


# ---------------------------------------------------------------------------- finding blocks
def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a (possibly peft-wrapped) HF model, in order.

    Uses the model's `_no_split_modules` class names when it has them (every HF decoder does);
    otherwise the longest ModuleList whose items share one class (e.g. `model.model.layers`).
    """
    base = unwrap_peft(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [
        ml for ml in base.modules()
        if isinstance(ml, nn.ModuleList) and len(ml) > 1 and len({type(m) for m in ml}) == 1
    ]
    if not lists:
        raise ValueError(f"{type(base).__name__}: no repeated decoder blocks found to shard")
    return list(max(lists, key=len))


def trainable_leaves(module: nn.Module) -> list[nn.Module]:
    """Leaf modules whose parameters all train (LoRA's lora_A / lora_B), when some others are frozen."""
    params = list(module.parameters())
    if all(p.requires_grad for p in params) or not any(p.requires_grad for p in params):
        return []
    leaves = []
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if own and not list(m.children()) and all(p.requires_grad for p in own):
            leaves.append(m)
    return leaves


def mixed_precision_policy(mixed_precision: Optional[str], device: torch.device):
    """FSDP2 MixedPrecisionPolicy: low-precision params for compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "auto":
        mixed_precision = "bf16" if device.type == "cuda" else None
    if mixed_precision is None:
        return MixedPrecisionPolicy()
    if mixed_precision not in _MP_DTYPES:
        raise ValueError(f"sharding.mixed_precision={mixed_precision!r}: choose auto, bf16, fp16 or null")
    return MixedPrecisionPolicy(param_dtype=_MP_DTYPES[mixed_precision], reduce_dtype=torch.float32)


def data_parallel_mesh(device_mesh):
    """The 1-D mesh FSDP2 shards over: the "data_parallel" dimension of Lightning's 2-D mesh."""
    if device_mesh.mesh_dim_names and "data_parallel" in device_mesh.mesh_dim_names:
        return device_mesh["data_parallel"]
    return device_mesh


# ---------------------------------------------------------------------------- sharding
def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute block activations in backward: transformers' own switch (non-reentrant)."""
    base = unwrap_peft(model)
    if not hasattr(base, "gradient_checkpointing_enable"):
        raise TypeError(f"{type(base).__name__} has no gradient_checkpointing_enable()")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def shard_model(
    model: nn.Module,
    device_mesh,
    *,
    reshard_after_forward: bool = True,
    mixed_precision: Optional[str] = "auto",
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Apply FSDP2 `fully_shard` to each decoder block, each block's LoRA adapters, the trainable
    leaves outside the blocks when the rest is frozen, then the root.

    `device_mesh` is Lightning's mesh (`LightningModule.device_mesh`); parameters shard over its
    "data_parallel" dimension. Returns the same (now sharded, in place) model.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = data_parallel_mesh(device_mesh)
    mp = mixed_precision_policy(mixed_precision, torch.device(mesh.device_type))

    def unit(modules):
        fully_shard(modules, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        for m in modules if isinstance(modules, list) else [modules]:
            m._lit_align_reshard_after_forward = reshard_after_forward  # restored by gathered_parameters

    if activation_checkpointing:
        enable_activation_checkpointing(model)
    blocks = decoder_blocks(model)
    for block in blocks:
        adapters = trainable_leaves(block)
        if adapters:  # one unit for the block's adapters, taken out of the block's unit
            unit(adapters)
        unit(block)
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    outside = [m for m in trainable_leaves(model) if id(m) not in in_blocks]
    if outside:  # e.g. a trained score head next to frozen embeddings (peft modules_to_save)
        unit(outside)
    unit(model)
    return model


def prepare_reference(
    model: nn.Module,
    device_mesh=None,
    *,
    reference: Literal["shard", "replicate"] = "shard",
    mixed_precision: Optional[str] = "auto",
) -> nn.Module:
    """Freeze a reference model (eval mode, no gradients) and shard or replicate it.

    "shard" splits it like the policy (memory / world); "replicate" keeps a full copy per rank
    (no communication in its forward; fits when the model is small). Without a mesh it is
    only frozen.
    """
    model.eval()
    model.requires_grad_(False)
    if device_mesh is None or reference == "replicate":
        return model
    if reference != "shard":
        raise ValueError(f"sharding.reference={reference!r}: choose shard or replicate")
    return shard_model(model, device_mesh, reshard_after_forward=True, mixed_precision=mixed_precision)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """Every FSDP2-managed module (unit) inside `model`."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the full (unsharded) weights of every FSDP2 unit while the block runs.

    For `generate`. Each unit is all-gathered once instead of at every decoded token, and a
    peft policy works at all: peft's `generate` calls the inner transformers model, skipping
    the root unit's forward, so without this the embeddings and LM head stay sharded
    ("aten.embedding.default got mixed torch.Tensor and DTensor"). transformers itself keeps
    ranks stepping together (`synced_gpus`) when ranks stop at different lengths. Costs the
    full model's memory on every rank while held. No-op for a model that is not sharded.
    """
    units = fsdp_units(model)
    _init_roots(units)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, "_lit_align_reshard_after_forward", True), recurse=False)


def _init_roots(units: list[nn.Module]) -> None:
    """Let the outermost units claim the FSDP root role before any forward.

    FSDP2 picks its root lazily as the first unit whose forward runs. `generate` of a peft
    model calls the inner transformers model, skipping the root's forward, so without this a
    decoder block would become a root and the next training forward would fail.
    """
    inner: set[int] = set()
    for unit in units:  # pre-order: an outer unit comes before the units inside it
        if id(unit) not in inner:
            unit._get_fsdp_state()._lazy_init()  # no-op once initialised
        inner.update(id(m) for m in unit.modules() if m is not unit)


# ---------------------------------------------------------------------------- strategies


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with FSDP2 over all processes, plus lit_align's sharding options.

    ModelParallelStrategy's "auto" sizes are tensor-parallel within a node and data-parallel
    across nodes; lit_align applies FSDP only, so here "auto" data parallelism means every
    process (num_nodes x devices / tensor_parallel_size) and tensor parallelism defaults to 1.
    The sharding options reach every module's `configure_model` through `AlignModule.shard_model`.

    Args:
        data_parallel_size: Processes parameters are sharded over ("auto": all of them).
        tensor_parallel_size: Kept at 1: lit_align modules do not apply tensor parallelism.
        save_distributed_checkpoint: True: each rank writes its shards (a checkpoint directory);
            False: rank 0 gathers one full .ckpt file (needs the whole model in its CPU memory).
        reshard_after_forward: See ShardingConfig.
        mixed_precision: See ShardingConfig.
        activation_checkpointing: See ShardingConfig.
        reference: See ShardingConfig.
        process_group_backend: "nccl" on GPUs, "gloo" on CPU by default.
        timeout: Collective timeout.
    """

    def __init__(
        self,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        tensor_parallel_size: Union[Literal["auto"], int] = 1,
        save_distributed_checkpoint: bool = True,
        reshard_after_forward: bool = True,
        mixed_precision: Optional[MixedPrecision] = "auto",
        activation_checkpointing: bool = False,
        reference: Literal["shard", "replicate"] = "shard",
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ):
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.sharding = ShardingConfig(reshard_after_forward, mixed_precision, activation_checkpointing, reference)
        mixed_precision_policy(mixed_precision, torch.device("cpu"))  # validate the name now

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and isinstance(self._tensor_parallel_size, int):
            world = self.num_nodes * self.num_processes
            if world % self._tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size={self._tensor_parallel_size} does not divide {world} processes")
            self._data_parallel_size = world // self._tensor_parallel_size
        super().setup_environment()


def strategy_options(strategy) -> dict:
    """The sharding options a strategy carries (FSDP2Strategy), as keyword arguments."""
    cfg = getattr(strategy, "sharding", None)
    return dataclasses.asdict(cfg) if isinstance(cfg, ShardingConfig) else {}


def apply_sharding(model: nn.Module, device_mesh, **options) -> nn.Module:
    """`AlignModule.shard_model`: a frozen model is a reference (`prepare_reference`), others
    `shard_model`; `options` are `ShardingConfig`'s fields (its defaults for those not given)."""
    cfg = ShardingConfig(**options)
    if not any(p.requires_grad for p in model.parameters()):
        return prepare_reference(model, device_mesh, reference=cfg.reference, mixed_precision=cfg.mixed_precision)
    return shard_model(
        model,
        device_mesh,
        reshard_after_forward=cfg.reshard_after_forward,
        mixed_precision=cfg.mixed_precision,
        activation_checkpointing=cfg.activation_checkpointing,
    )


class CudaFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1, CUDA only), failing early with what to use on CPU."""

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise RuntimeError(
                f"FSDPStrategy (configs/strategy/fsdp.yaml) shards over CUDA GPUs, but this run is on "
                f"{self.root_device.type!r}. Use configs/strategy/fsdp2.yaml (ModelParallelStrategy + FSDP2, "
                "runs on CPU with gloo) or configs/strategy/ddp.yaml instead."
            )
        super().setup_environment()


class DecoderBlockWrapPolicy(ModuleWrapPolicy):
    """FSDP1 auto-wrap policy: a unit per decoder block of every HF model in the LightningModule
    (classes from `_no_split_modules`), plus a unit per block's trainable leaves (LoRA adapters)
    when the block also holds frozen weights, as litgpt does."""

    def __init__(self):
        super().__init__(set())

    def _run_policy(self, root_module, ignored_modules, root_kwargs):
        targets: list[nn.Module] = []
        # duplicates (peft wrappers, nested PreTrainedModels) collapse in dict.fromkeys below
        for hf_model in [m for m in root_module.modules() if hasattr(m, "_no_split_modules")]:
            blocks = decoder_blocks(hf_model)
            for block in blocks:
                targets += [*trainable_leaves(block), block]
            in_blocks = {id(m) for block in blocks for m in block.modules()}
            targets += [m for m in trainable_leaves(hf_model) if id(m) not in in_blocks]
        return {m: dict(root_kwargs) for m in dict.fromkeys(targets) if m not in ignored_modules}
