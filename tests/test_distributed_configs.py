"""Strategy configs and sharding helpers, in one process (no process group is started here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def build_cli(tiny_model_dir: Path, *configs: str, extra: tuple[str, ...] = ()):
    """LightningCLI exactly as `lit-align fit` builds it, without running."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from lit_align.data.datamodule import AlignDataModule

    args = ["-c", str(ROOT / "configs" / "dpo_tiny.yaml")]
    for c in configs:
        args += ["-c", str(ROOT / "configs" / "strategy" / c)]
    args += ["--model.init_args.policy.name_or_path", str(tiny_model_dir), "--data.path", "unused.jsonl", *extra]
    return LightningCLI(L.LightningModule, AlignDataModule, subclass_mode_model=True, run=False,
                        auto_configure_optimizers=False, seed_everything_default=0, args=args)


def test_fsdp_config_builds_and_on_cpu_says_what_to_use(tiny_model_dir):
    from torch.distributed.fsdp import ShardingStrategy

    from lit_align.sharding import CudaFSDPStrategy, DecoderBlockWrapPolicy

    cli = build_cli(tiny_model_dir, "fsdp.yaml", extra=("--trainer.devices", "1"))
    strategy = cli.trainer.strategy
    assert isinstance(strategy, CudaFSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderBlockWrapPolicy)
    assert strategy._state_dict_type == "sharded"
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.root_device.type == "cpu"  # accelerator: auto on this machine
    # the first thing Trainer.fit asks of a strategy, before any process group exists
    with pytest.raises(RuntimeError, match=r"configs/strategy/fsdp2\.yaml.*gloo"):
        strategy.setup_environment()


def test_fsdp2_and_ddp_configs_build(tiny_model_dir):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lit_align.sharding import FSDP2Strategy, ShardingConfig

    strategy = build_cli(tiny_model_dir, "fsdp2.yaml").trainer.strategy
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy.sharding == ShardingConfig(True, "auto", False, "shard")
    assert strategy._tensor_parallel_size == 1 and strategy._save_distributed_checkpoint
    custom = build_cli(tiny_model_dir, "fsdp2.yaml", extra=(
        "--trainer.strategy.init_args.reference", "replicate",
        "--trainer.strategy.init_args.activation_checkpointing", "true",
    )).trainer.strategy
    assert custom.sharding.reference == "replicate" and custom.sharding.activation_checkpointing
    ddp = build_cli(tiny_model_dir, "ddp.yaml").trainer.strategy
    assert isinstance(ddp, DDPStrategy)


def test_fsdp2_strategy_rejects_unknown_mixed_precision():
    from lit_align.sharding import FSDP2Strategy

    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        FSDP2Strategy(mixed_precision="fp8")


# ---------------------------------------------------------------------------- helpers
@pytest.fixture()
def lora_model(tiny_model_dir):
    from lit_align.models import LoraArgs, PolicyConfig, load_causal_lm

    return load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir), lora=LoraArgs(r=4, target_modules=["q_proj", "v_proj"])))


def test_decoder_blocks_found_through_peft(lora_model, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lit_align.sharding import decoder_blocks

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert decoder_blocks(plain) == list(plain.model.layers)
    blocks = decoder_blocks(lora_model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    assert blocks == list(lora_model.get_base_model().model.layers)


def test_decoder_blocks_fallback_and_error():
    from lit_align.sharding import decoder_blocks

    stack = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)]))
    assert decoder_blocks(stack) == list(stack[1])
    with pytest.raises(ValueError, match="no repeated decoder blocks"):
        decoder_blocks(torch.nn.Linear(2, 2))


def test_trainable_leaves_are_the_lora_adapters(lora_model):
    from lit_align.sharding import decoder_blocks, trainable_leaves

    block = decoder_blocks(lora_model)[0]
    leaves = trainable_leaves(block)
    names = {n for n, m in block.named_modules() if any(m is leaf for leaf in leaves)}
    assert names == {f"self_attn.{p}.lora_{ab}.default" for p in ("q_proj", "v_proj") for ab in "AB"}
    # a fully trainable or fully frozen block needs no separate adapter unit
    block.requires_grad_(True)
    assert trainable_leaves(block) == []


def test_fsdp1_wrap_policy_targets_blocks_and_adapters(lora_model, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lit_align.sharding import DecoderBlockWrapPolicy

    holder = torch.nn.Module()
    holder.policy = lora_model
    holder.reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)
    targets = DecoderBlockWrapPolicy()._run_policy(holder, set(), {"x": 1})
    names = {n for n, m in holder.named_modules() if m in targets}
    blocks = {f"policy.base_model.model.model.layers.{i}" for i in range(2)} | {f"reference.model.layers.{i}" for i in range(2)}
    adapters = {f"policy.base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.default"
                for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"}
    assert names == blocks | adapters
    assert all(kwargs == {"x": 1} for kwargs in targets.values())


def test_mixed_precision_policy():
    from lit_align.sharding import mixed_precision_policy

    assert mixed_precision_policy("auto", torch.device("cpu")).param_dtype is None
    cuda = mixed_precision_policy("auto", torch.device("cuda"))
    assert cuda.param_dtype == torch.bfloat16 and cuda.reduce_dtype == torch.float32
    assert mixed_precision_policy(None, torch.device("cuda")).param_dtype is None
    with pytest.raises(ValueError, match="choose auto, bf16, fp16 or null"):
        mixed_precision_policy("int8", torch.device("cpu"))


def test_gathered_parameters_is_a_no_op_without_sharding(lora_model):
    from lit_align.sharding import gathered_parameters

    before = {k: v.clone() for k, v in lora_model.state_dict().items()}
    with gathered_parameters(lora_model) as model:
        assert model is lora_model
    assert all(torch.equal(before[k], v) for k, v in lora_model.state_dict().items())
