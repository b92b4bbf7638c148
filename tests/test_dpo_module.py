"""DPOModule end to end on the tiny model: CLI run, reference modes, resume, export."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align.cli import main
from lit_align.data.datamodule import AlignDataModule
from lit_align.models import LoraArgs, PolicyConfig
from lit_align.modules.dpo import DPOModule

ROOT = Path(__file__).resolve().parents[1]
HH = "hh_rlhf_harmless_base_test.jsonl.gz"
TRL_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]


def datamodule(shared_data, **kw):
    args = dict(format="hh_rlhf", limit=48, batch_size=4, max_prompt_length=64, max_completion_length=32, on_bad_rows="skip")
    args.update(kw)
    return AlignDataModule(str(shared_data / HH), **args)


def trainer(tmp_path, **kw):
    args = dict(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=2, num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(**args)


def test_cli_fit_logs_trl_metrics_checkpoints_and_exports(tiny_model_dir, shared_data, tmp_path):
    export = tmp_path / "export"
    main([
        "fit", "-c", str(ROOT / "configs/dpo_tiny.yaml"),
        f"--model.init_args.policy.name_or_path={tiny_model_dir}",
        f"--model.init_args.export_dir={export}",
        f"--data.path={shared_data / HH}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
    ])
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    columns = set(rows[0])
    for name in ["loss", "eval_loss", *TRL_METRICS, *[f"eval_{m}" for m in TRL_METRICS]]:
        assert name in columns, name
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("reference.") for k in state), "the frozen reference is not saved"

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(export)
    module = DPOModule.load_from_checkpoint(ckpt, weights_only=True)
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p, module.policy.get_parameter(name))


def test_print_config(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(ROOT / "configs/dpo_tiny.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: lit_align.DPOModule" in out and "loss_type: sigmoid" in out and "reranker" in out


def test_lora_base_reference_starts_at_log2_and_exports(tiny_model_dir, shared_data, tmp_path):
    policy = PolicyConfig(name_or_path=str(tiny_model_dir), lora=LoraArgs(r=4, alpha=8))
    module = DPOModule(policy, reference="lora_base", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    t = trainer(tmp_path)
    [metrics] = t.validate(module, datamodule=datamodule(shared_data), verbose=False)
    # LoRA's B starts at zero: policy == reference, z = 0, loss = log 2, no copy in memory
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert module.reference is None
    t = trainer(tmp_path, max_steps=3)
    t.fit(module, datamodule=datamodule(shared_data))
    [after] = t.validate(module, datamodule=datamodule(shared_data), verbose=False)
    assert after["eval_loss"] != pytest.approx(math.log(2), abs=1e-6)

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = module.policy.eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(module.export(tmp_path / "merged", merge_lora=True))
        adapter = AutoPeftModelForCausalLM.from_pretrained(module.export(tmp_path / "adapter", merge_lora=False))
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_cached_reference_equals_copy_and_is_reused(tiny_model_dir, shared_data, tmp_path):
    cache = tmp_path / "ref_cache"
    policy = PolicyConfig(name_or_path=str(tiny_model_dir))

    def validate_with(reference, dm):
        module = DPOModule(policy, reference=reference, reference_cache_dir=str(cache))
        t = trainer(tmp_path)
        if reference == "cached":  # the cache is filled when fitting starts
            t = trainer(tmp_path, max_steps=0)
            t.fit(module, datamodule=dm)
        return t.validate(module, datamodule=dm, verbose=False)[0]["eval_loss"]

    copy_loss = validate_with("copy", datamodule(shared_data))
    cached_loss = validate_with("cached", datamodule(shared_data))
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2  # train and val
    stamps = [f.stat().st_mtime_ns for f in files]
    assert cached_loss == pytest.approx(copy_loss, abs=1e-6)
    # a second run reads the files instead of recomputing them
    assert validate_with("cached", datamodule(shared_data)) == pytest.approx(copy_loss, abs=1e-6)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # another tokenisation setting is another fingerprint
    validate_with("cached", datamodule(shared_data, max_completion_length=24))
    assert len(list(cache.glob("*.pt"))) == 4


def test_resume_from_checkpoint_continues(tiny_model_dir, shared_data, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    policy = PolicyConfig(name_or_path=str(tiny_model_dir))
    opt = lambda p: torch.optim.AdamW(p, lr=1e-3)  # noqa: E731
    ckpts = tmp_path / "ckpts"
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                callbacks=[ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2, save_top_k=-1)])
    t.fit(DPOModule(policy, optimizer=opt), datamodule=datamodule(shared_data))
    [ckpt] = list(ckpts.glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 2 and saved["optimizer_states"]

    resumed = DPOModule(policy, optimizer=opt)
    t = trainer(tmp_path, max_steps=4)
    t.fit(resumed, datamodule=datamodule(shared_data), ckpt_path=ckpt)
    assert t.global_step == 4
    # the reference stayed the original model while the policy moved
    original = DPOModule(policy)
    original.configure_model()
    for (name, ref), (_, init) in zip(resumed.reference.named_parameters(), original.policy.named_parameters()):
        torch.testing.assert_close(ref, init, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(resumed.policy.parameters(), original.policy.parameters()))


def test_sft_weight_adds_the_chosen_nll(tiny_model_dir, shared_data, tmp_path):
    """With sft_weight w the loss is DPO + w · NLL(chosen); at LoRA init DPO is exactly log 2."""
    policy = PolicyConfig(name_or_path=str(tiny_model_dir), lora=LoraArgs(r=4, alpha=8))
    module = DPOModule(policy, reference="lora_base", sft_weight=0.5)
    [metrics] = trainer(tmp_path).validate(module, datamodule=datamodule(shared_data), verbose=False)
    nll = metrics["eval_nll_loss"]
    assert nll > 1.0  # a random tiny model: several nats per token
    assert metrics["eval_loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)
