"""ConfidenceReRanker changes exactly the pairs it should under each policy."""

import math

import pytest
import torch

from lit_align.probes import ConfidenceReRanker
from lit_align.probes.confidence import pair_confidence

LN3 = math.log(3.0)
# pair 0: probe agrees strongly; pair 1: undecided (γ = 0.5); pair 2: probe disagrees; pair 3: mild agreement
S_C = torch.tensor([LN3, 0.0, -LN3, 0.1])
S_R = torch.tensor([-LN3, 0.0, LN3, 0.0])
GAMMA = pair_confidence(S_C, S_R)


def run(reranker):
    return reranker({"index": torch.arange(4)}, S_C, S_R)


def test_gamma_fixture_is_what_the_tests_assume():
    assert GAMMA[0] > 0.97 and GAMMA[1] == 0.5 and GAMMA[2] < 0.03 and 0.5 < GAMMA[3] < 0.6


def test_soft_pair_weights_only():
    batch = run(ConfidenceReRanker("soft", "pair"))
    assert batch["pair_confidence"].tolist() == pytest.approx([GAMMA[0].item(), 0.5, 0.5, GAMMA[3].item()])
    assert not batch["pair_flip"].any() and batch["pair_keep"].all()
    assert batch["index"].tolist() == [0, 1, 2, 3]  # nothing else touched


def test_flip_pair_flips_only_the_disagreeing_pair():
    batch = run(ConfidenceReRanker("flip", "pair"))
    assert batch["pair_flip"].tolist() == [False, False, True, False]
    assert batch["pair_keep"].all()
    assert batch["pair_confidence"][2].item() == pytest.approx(1 - GAMMA[2].item())
    assert batch["pair_confidence"][[0, 1, 3]].tolist() == pytest.approx(GAMMA[[0, 1, 3]].tolist())
    stats = batch["rerank_stats"]
    assert stats["rerank/flipped_frac"] == 0.25 and stats["rerank/dropped_frac"] == 0.0
    assert stats["rerank/probe_accuracy"] == 0.5  # pairs 0 and 3 have s_c > s_r


@pytest.mark.parametrize("threshold,expected_keep", [(0.5, [True, True, False, True]), (0.6, [True, False, False, False])])
def test_drop_pair_masks_pairs_below_threshold(threshold, expected_keep):
    batch = run(ConfidenceReRanker("drop", "pair", drop_threshold=threshold))
    assert batch["pair_keep"].tolist() == expected_keep
    assert not batch["pair_flip"].any()
    assert batch["rerank_stats"]["rerank/dropped_frac"] == expected_keep.count(False) / 4


def test_batch_granularity_uses_one_gamma_for_all_pairs():
    # batch means: σ(s_c) = (.75 .5 .25 .525), σ(s_r) = (.25 .5 .75 .5) -> c̄ - r̄ = 0.00625
    c_bar = torch.sigmoid(S_C).mean() - 0.5
    r_bar = torch.sigmoid(S_R).mean() - 0.5
    gamma = torch.sigmoid(7.5 * (c_bar - r_bar)).item()
    batch = run(ConfidenceReRanker("soft", "batch"))
    assert batch["pair_confidence"].tolist() == pytest.approx([gamma] * 4)
    # the whole batch disagrees with the probe: flip flips all pairs, drop drops all
    flipped = ConfidenceReRanker("flip", "batch")({}, S_R, S_C)
    assert flipped["pair_flip"].all()
    assert flipped["pair_confidence"].tolist() == pytest.approx([gamma] * 4)
    dropped = ConfidenceReRanker("drop", "batch")({}, S_R, S_C)
    assert not dropped["pair_keep"].any()


def test_totals_resume_through_state_dict():
    reranker = ConfidenceReRanker("flip", "pair")
    run(reranker)
    run(reranker)
    state = reranker.state_dict()
    assert state["totals"]["pairs"] == 8 and state["totals"]["flipped"] == 2
    resumed = ConfidenceReRanker("flip", "pair")
    resumed.load_state_dict(state)
    batch = run(resumed)
    assert batch["rerank_stats"]["rerank/flipped_total"] == 3.0
    assert resumed.state_dict()["totals"]["batches"] == 3


def test_without_scores_the_batch_passes_through():
    batch = {"index": torch.arange(2)}
    assert ConfidenceReRanker()(batch) is batch and "pair_confidence" not in batch


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="policy='flop'"):
        ConfidenceReRanker("flop")
    with pytest.raises(ValueError, match="granularity='row'"):
        ConfidenceReRanker("soft", "row")
