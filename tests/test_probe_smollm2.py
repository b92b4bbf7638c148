"""A probe on the real SmolLM2-135M-Instruct separates harmful from harmless instructions."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_probe_held_out_auroc(shared_data, tmp_path):
    from torchmetrics.functional.classification import binary_auroc

    from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer
    from lit_align.probes import HybridProbe, load_probe
    from lit_align.probes.features import cached_features, encode_texts
    from lit_align.probes.train import fit_probe

    folder = shared_data / "refusal_direction"
    read = lambda name, n: [r["instruction"] for r in json.loads((folder / name).read_text())][:n]  # noqa: E731
    train = read("harmful_train.json", 32) + read("harmless_train.json", 32)
    held_out = read("harmful_val.json", 20) + read("harmless_val.json", 20)
    y_train = torch.tensor([0.0] * 32 + [1.0] * 32)
    y_held = torch.tensor([0.0] * 20 + [1.0] * 20)

    cfg = PolicyConfig(name_or_path="smollm2-135m-instruct")
    tok, model = load_tokenizer(cfg), load_causal_lm(cfg)
    layers = [6, 12, 18, 24, 30]
    features, _ = cached_features(model, encode_texts(tok, train + held_out), layers, pad_token_id=tok.pad_token_id, cache_dir=tmp_path, progress=False)
    probe = HybridProbe(model.config.hidden_size, layers)
    fit_probe(probe, features[:64], y_train, epochs=60)
    with torch.no_grad():
        auroc = binary_auroc(probe(features[64:]), y_held.long()).item()
    print(f"SmolLM2-135M hybrid probe (layers {layers}), harmful vs harmless instructions: held-out AUROC {auroc:.3f} on 40 rows")
    assert auroc > 0.9
    probe.save(tmp_path / "probe.safetensors")
    assert load_probe(tmp_path / "probe.safetensors", expected_hidden_size=576, expected_num_layers=30).layers == layers
