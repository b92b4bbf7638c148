"""ProbeModule through LightningCLI on real text with the tiny model."""

import json

import pytest
import torch

from lit_align.lightning_cli import run_lightning_cli
from lit_align.probes import load_probe

CONFIG = "configs/probe.yaml"


def write_instructions(shared_data, out, n):
    """harmful (label 0) and harmless (label 1) instructions as a labelled jsonl file."""
    folder = shared_data / "refusal_direction"
    harmful = json.loads((folder / "harmful_train.json").read_text())[:n]
    harmless = json.loads((folder / "harmless_train.json").read_text())[:n]
    with out.open("w") as f:
        for rows, label in ((harmful, 0), (harmless, 1)):
            for r in rows:
                f.write(json.dumps({"text": r["instruction"], "label": label}) + "\n")
    return out


def fit(config_root, run_dir, cache_dir, tiny_model_dir, *overrides):
    args = [
        "fit", "-c", str(config_root / CONFIG),
        f"--model.init_args.backbone.name_or_path={tiny_model_dir}",
        f"--model.init_args.cache_dir={cache_dir}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        *overrides,
    ]
    return run_lightning_cli(args)


@pytest.fixture
def config_root(request):
    return request.config.rootpath


def test_probe_module_labeled_beats_chance_and_reuses_features(config_root, shared_data, tiny_model_dir, tmp_path):
    data = write_instructions(shared_data, tmp_path / "instructions.jsonl", 120)
    common = [
        f"--data.path={data}", "--data.format=generic", "--data.mode=labeled", "--data.limit=null",
        "--data.val_fraction=0.3", "--data.batch_size=32", "--trainer.max_epochs=40",
        "--model.init_args.pooling=mean",
    ]
    cli = fit(config_root, tmp_path / "run1", tmp_path / "cache", tiny_model_dir, *common)
    module = cli.model
    assert not any(module.reused.values())
    auroc = float(cli.trainer.callback_metrics["eval_auroc"])
    print(f"tiny model, harmful vs harmless instructions: held-out AUROC {auroc:.3f} ({len(module.labels['val'])} rows)")
    assert auroc > 0.65
    assert 0.5 < float(cli.trainer.callback_metrics["eval_accuracy"]) <= 1.0

    probe = load_probe(tmp_path / "run1" / "probe.safetensors", expected_hidden_size=32)
    assert probe.layers == [1, 2] and probe.pooling == "mean"
    with torch.no_grad():  # the saved probe is the trained one
        torch.testing.assert_close(probe(module.features["val"]["text"]), module.probe.cpu()(module.features["val"]["text"]))
    table = (tmp_path / "run1" / "per_layer_auroc.csv").read_text().splitlines()
    assert table[0] == "layer,probe_layer_auroc,mean_diff_auroc" and [r.split(",")[0] for r in table[1:]] == ["1", "2", "all"]
    check_per_layer_table(table, probe, module)
    md = (tmp_path / "run1" / "per_layer_auroc.md").read_text().splitlines()
    assert md[-1].startswith("| all | ") and f"{float(table[-1].split(',')[1]):.3f}" in md[-1]

    again = fit(config_root, tmp_path / "run2", tmp_path / "cache", tiny_model_dir, *common, "--trainer.max_epochs=1")
    assert again.model.reused == {"train/text": True, "val/text": True}
    torch.testing.assert_close(again.model.features["val"]["text"], module.features["val"]["text"])


def test_probe_module_on_preference_pairs(config_root, shared_data, tiny_model_dir, tmp_path):
    cli = fit(
        config_root, tmp_path / "run", tmp_path / "cache", tiny_model_dir,
        f"--data.path={shared_data / 'hh_rlhf_harmless_base_test.jsonl.gz'}", "--data.limit=48",
        "--data.batch_size=8", "--data.max_prompt_length=64", "--data.max_completion_length=32",
        "--trainer.max_epochs=2", "--model.init_args.layers=[-1]", "--model.init_args.kind=logistic",
    )
    module = cli.model
    assert module.mode == "preference" and set(module.features["val"]) == {"chosen", "rejected"}
    probe = load_probe(tmp_path / "run" / "probe.safetensors", expected_hidden_size=32)
    with torch.no_grad():
        s_c, s_r = probe(module.features["val"]["chosen"]), probe(module.features["val"]["rejected"])
    expected = (s_c > s_r).float().mean().item()
    assert float(cli.trainer.callback_metrics["eval_pairwise_accuracy"]) == pytest.approx(expected)
    header = (tmp_path / "run" / "per_layer_auroc.csv").read_text().splitlines()[0]
    assert "probe_layer_pairwise_accuracy" in header and "mean_diff_pairwise_accuracy" in header


def test_probe_module_rejects_bad_settings(tiny_model_dir):
    from lit_align.models import PolicyConfig
    from lit_align.modules.probe import ProbeModule

    backbone = PolicyConfig(name_or_path=str(tiny_model_dir))
    with pytest.raises(ValueError, match="reads exactly one layer"):
        ProbeModule(backbone, kind="logistic")
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        ProbeModule(backbone, layers=[5])
    with pytest.raises(ValueError, match="model.loss='hinge'"):
        ProbeModule(backbone, loss="hinge")


def rank_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a label-1 row > score of a label-0 row), ties counting one half (Mann-Whitney)."""
    pos, neg = scores[labels == 1].double(), scores[labels == 0].double()
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


def check_per_layer_table(table: list[str], probe, module) -> None:
    """The CSV's numbers against AUROCs computed here by rank counting: the probe's own score per
    layer, s_l = w_l · (h_l − μ_l) / σ_l + b_l, the whole probe for "all", and the mean-difference
    direction μ_safe − μ_unsafe of each layer's standardised training features."""
    train, train_labels = module.features["train"]["text"].double(), module.labels["train"]
    val, val_labels = module.features["val"]["text"].double(), module.labels["val"]
    rows = [line.split(",") for line in table[1:]]
    for i, (layer, probe_auroc, mean_diff_auroc) in enumerate(rows[:-1]):
        h = (val[:, i] - probe.feature_mean[i].double()) / probe.feature_std[i].double()
        own = h @ probe.weight[i].detach().double() + float(probe.bias[i])
        assert float(probe_auroc) == pytest.approx(rank_auroc(own, val_labels), abs=1e-6), layer
        mean, std = train[:, i].mean(0), train[:, i].std(0).clamp(min=1e-6)
        standard = (train[:, i] - mean) / std
        direction = standard[train_labels == 1].mean(0) - standard[train_labels == 0].mean(0)
        baseline = ((val[:, i] - mean) / std) @ direction
        assert float(mean_diff_auroc) == pytest.approx(rank_auroc(baseline, val_labels), abs=1e-6), layer
    with torch.no_grad():
        full = probe(module.features["val"]["text"])
    assert float(rows[-1][1]) == pytest.approx(rank_auroc(full, val_labels), abs=1e-6)
