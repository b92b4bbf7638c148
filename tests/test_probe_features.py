"""Feature extraction with a frozen tiny backbone, the disk cache, and a probe on real text."""

import json

import pytest
import torch

from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer
from lit_align.probes import HybridProbe, LogisticProbe, MeanDiffProbe
from lit_align.probes.features import cached_features, encode_texts, extract_features, resolve_layers
from lit_align.probes.train import fit_probe


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    cfg = PolicyConfig(name_or_path=str(tiny_model_dir))
    return load_causal_lm(cfg), load_tokenizer(cfg)


def test_resolve_layers():
    assert resolve_layers(None, 3) == [1, 2, 3]
    assert resolve_layers([-1, 1], 3) == [3, 1]
    with pytest.raises(ValueError, match="layer 4 is out of range for a model with 3 layers"):
        resolve_layers([4], 3)


def test_batched_extraction_matches_one_by_one(tiny):
    model, tok = tiny
    ids = encode_texts(tok, ["hi", "how do I bake bread?", "tell me a joke"], [None, "Mix flour.", None])
    assert ids[1][-1] == tok.eos_token_id  # response texts end with EOS
    batched = extract_features(model, ids, [1, 2], batch_size=3, pad_token_id=tok.pad_token_id, progress=False)
    assert batched.shape == (3, 2, 32) and model.training  # train mode restored
    for i, row in enumerate(ids):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([row]), output_hidden_states=True)
        expected = torch.stack([out.hidden_states[1][0, -1], out.hidden_states[2][0, -1]])
        torch.testing.assert_close(batched[i], expected, atol=1e-5, rtol=1e-4)


def test_cache_reuse_and_invalidation(tiny, tmp_path):
    model, tok = tiny
    ids = encode_texts(tok, ["a question", "another question", "a third one"])
    kwargs = dict(pad_token_id=tok.pad_token_id, cache_dir=tmp_path, progress=False)
    first, reused = cached_features(model, ids, [1, 2], **kwargs)
    assert not reused and len(list(tmp_path.glob("*.safetensors"))) == 1
    again, reused = cached_features(model, ids, [1, 2], **kwargs)
    assert reused
    torch.testing.assert_close(again, first)
    # new text, other layers, other pooling, changed weights: each a new entry
    assert not cached_features(model, ids[:2], [1, 2], **kwargs)[1]
    assert not cached_features(model, ids, [2], **kwargs)[1]
    assert not cached_features(model, ids, [1, 2], pooling="mean", **kwargs)[1]
    weight = model.model.layers[0].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.01)
    try:
        changed, reused = cached_features(model, ids, [1, 2], **kwargs)
        assert not reused and not torch.allclose(changed, first)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert cached_features(model, ids, [1, 2], **kwargs)[1]  # the original weights hit the cache again
    assert len(list(tmp_path.glob("*.safetensors"))) == 5
    assert cached_features(model, ids, [1, 2], batch_size=1, desc="other", **kwargs)[1]  # extraction options: same key
    with pytest.raises(TypeError, match="batchsize"):  # a misspelt option fails on a cache hit as on a miss
        cached_features(model, ids, [1, 2], batchsize=1, **kwargs)


def load_instructions(shared_data, n):
    folder = shared_data / "refusal_direction"
    harmful = [r["instruction"] for r in json.loads((folder / "harmful_train.json").read_text())][:n]
    harmless = [r["instruction"] for r in json.loads((folder / "harmless_train.json").read_text())][:n]
    return harmful + harmless, torch.tensor([0.0] * len(harmful) + [1.0] * len(harmless))


@pytest.mark.parametrize("kind", ["hybrid", "logistic", "mean_diff"])
def test_probe_on_real_instructions_beats_chance(tiny, shared_data, kind):
    from torchmetrics.functional.classification import binary_auroc

    model, tok = tiny
    texts, labels = load_instructions(shared_data, 120)
    features = extract_features(model, encode_texts(tok, texts), [1, 2], pooling="mean", pad_token_id=tok.pad_token_id, progress=False)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:160], order[160:]
    probe = {"hybrid": HybridProbe(32, [1, 2], "mean"), "logistic": LogisticProbe(32, 2, "mean"), "mean_diff": MeanDiffProbe(32, 2, "mean")}[kind]
    layer_features = features if kind == "hybrid" else features[:, 1:]
    history = fit_probe(probe, layer_features[train], labels[train], epochs=60)
    if kind != "mean_diff":  # the mean-difference direction is closed-form; training only calibrates it
        assert history[-1] < history[0]
    with torch.no_grad():
        auroc = binary_auroc(probe(layer_features[held_out]), labels[held_out].long()).item()
    print(f"{kind} probe on the tiny random model: held-out AUROC {auroc:.3f} ({len(held_out)} rows)")
    assert auroc > 0.65
