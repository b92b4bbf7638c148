"""Probe losses, confidence formulas and probe modules against hand-computed values."""

import math

import pytest
import torch

from lit_align.losses.probe import bce_loss, pairwise_accuracy, pairwise_margin_loss
from lit_align.probes import HybridProbe, LogisticProbe, MeanDiffProbe, load_probe, select_features
from lit_align.probes.confidence import batch_confidence, pair_confidence

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75


def test_pairwise_margin_loss_by_hand():
    s_c, s_r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    loss, c, r = pairwise_margin_loss(s_c, s_r, margin=1.0)
    # pair 0: 2 - 1 - 1 = 0 -> ln 2; pair 1: 0 - 0 - 1 = -1 -> log(1 + e)
    expected = (math.log(2.0) + math.log(1 + math.e)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert c is s_c and r is s_r
    assert pairwise_margin_loss(s_c, s_r, margin=0.0)[0].item() == pytest.approx(
        (math.log(1 + math.exp(-1)) + math.log(2.0)) / 2, rel=1e-6
    )
    assert pairwise_accuracy(s_c, s_r).item() == 0.5


def test_bce_loss_by_hand():
    scores, labels = torch.tensor([LN3, 0.0]), torch.tensor([1.0, 0.0])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert bce_loss(scores, labels).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        bce_loss(scores, labels[:1])


def test_batch_confidence_by_hand():
    s_c, s_r = torch.tensor([0.0, LN3]), torch.tensor([0.0, -LN3])
    # c̄ = (0.5 + 0.75)/2 - 0.5 = 0.125, r̄ = (0.5 + 0.25)/2 - 0.5 = -0.125
    expected = 1 / (1 + math.exp(-7.5 * 0.25))
    assert batch_confidence(s_c, s_r).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.867036, abs=1e-6)
    # reversed labels: σ(-1.875) = 0.133 is clamped to 0.5, or returned as is with floor=None
    assert batch_confidence(s_r, s_c).item() == 0.5
    assert batch_confidence(s_r, s_c, floor=None).item() == pytest.approx(1 - expected, rel=1e-6)
    assert batch_confidence(s_c, s_r, alpha=1.0).item() == pytest.approx(1 / (1 + math.exp(-0.25)), rel=1e-6)


def test_pair_confidence_by_hand():
    s_c, s_r = torch.tensor([0.0, LN3, -LN3]), torch.tensor([0.0, -LN3, LN3])
    gamma = pair_confidence(s_c, s_r)
    # σ(7.5 · 0) = 0.5, σ(7.5 · 0.5) = σ(3.75), σ(-3.75)
    expected = [0.5, 1 / (1 + math.exp(-3.75)), 1 / (1 + math.exp(3.75))]
    assert gamma.tolist() == pytest.approx(expected, rel=1e-6)


def test_hybrid_probe_matches_the_formula():
    torch.manual_seed(0)
    probe = HybridProbe(hidden_size=5, layers=[1, 2, 3])
    with torch.no_grad():
        probe.weight.normal_()
        probe.bias.normal_()
        probe.vote.weight.normal_()
    features = torch.randn(4, 3, 5)
    scores = probe(features)
    for b in range(4):
        s = [probe.weight[l] @ features[b, l] + probe.bias[l] for l in range(3)]
        s = torch.stack(s)
        g = torch.sigmoid(probe.vote.weight @ s)  # W_vote s, no bias
        assert scores[b].item() == pytest.approx((g * s).sum().item(), rel=1e-5)
    assert scores.shape == (4,)
    with pytest.raises(ValueError, match=r"expects features \[B, 3, 5\]"):
        probe(torch.randn(4, 2, 5))


def test_feature_standardisation_is_applied_before_the_probe():
    probe = LogisticProbe(hidden_size=2, layer=4)
    features = torch.tensor([[[10.0, 100.0]], [[12.0, 300.0]], [[14.0, 200.0]]])
    probe.set_feature_stats(features)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.tensor([[1.0, 0.0]]))
    # standardised first coordinate: (x - 12) / 2
    assert probe(features).tolist() == pytest.approx([-1.0, 0.0, 1.0], rel=1e-6)


def test_mean_diff_probe_separates_means():
    safe = torch.tensor([[[2.0, 0.0]], [[4.0, 0.0]]])
    unsafe = torch.tensor([[[-2.0, 1.0]], [[-4.0, 1.0]]])
    probe = MeanDiffProbe(hidden_size=2, layer=1).fit(torch.cat([safe, unsafe]), torch.tensor([1, 1, 0, 0]))
    d = torch.tensor([6.0, -1.0]) / math.sqrt(37)  # μ_safe - μ_unsafe = (3,0) - (-3,1)
    assert probe.direction.tolist() == pytest.approx(d.tolist(), rel=1e-6)
    scores = probe(torch.cat([safe, unsafe]))
    assert (scores[:2] > 0).all() and (scores[2:] < 0).all()
    with pytest.raises(ValueError, match="both labels"):
        probe.fit(safe, torch.tensor([1, 1]))


@pytest.mark.parametrize(
    "probe",
    [HybridProbe(8, [1, 3], pooling="mean"), LogisticProbe(8, 2), MeanDiffProbe(8, 2)],
    ids=["hybrid", "logistic", "mean_diff"],
)
def test_probe_save_load_roundtrip_and_wrong_size(tmp_path, probe):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in probe.parameters():
            p.normal_()
    features = torch.randn(6, len(probe.layers), 8)
    probe.set_feature_stats(torch.randn(10, len(probe.layers), 8) * 3)
    path = probe.save(tmp_path / "probe.safetensors")
    loaded = load_probe(path, expected_hidden_size=8, expected_num_layers=3)
    assert type(loaded) is type(probe)
    assert loaded.layers == probe.layers and loaded.hidden_size == 8 and loaded.pooling == probe.pooling
    torch.testing.assert_close(loaded(features), probe(features))
    with pytest.raises(ValueError, match=r"probe\.safetensors.*hidden size 8.*hidden size 16"):
        load_probe(path, expected_hidden_size=16)
    with pytest.raises(ValueError, match="only 1 layers"):
        load_probe(path, expected_num_layers=1)


def test_load_probe_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors is not a lit_align probe"):
        load_probe(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_probe(tmp_path / "missing.safetensors")


def test_select_features_last_and_mean_with_right_and_left_padding():
    # three "layers" (index 0 = embeddings), B=2, T=4, H=1: value = 10*layer + position
    hidden = tuple(torch.tensor([[[10.0 * l + t] for t in range(4)]] * 2) for l in range(3))
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    out = select_features(hidden, right, layers=[1, 2])
    assert out.shape == (2, 2, 1)
    assert out[:, :, 0].tolist() == [[12.0, 22.0], [11.0, 21.0]]  # last real token: 2 and 1
    assert select_features(hidden, left, layers=[2])[:, 0, 0].tolist() == [23.0, 23.0]
    mean = select_features(hidden, right, layers=[1], pooling="mean")
    assert mean[:, 0, 0].tolist() == pytest.approx([11.0, 10.5])
    with pytest.raises(ValueError, match="out of range"):
        select_features(hidden, right, layers=[3])
    with pytest.raises(ValueError, match="pooling"):
        select_features(hidden, right, layers=[1], pooling="max")
