"""ConfidenceReRanker decides exactly the pairs it should under each action; PairDecision applies it."""

import math

import pytest
import torch

from lit_align.data.rerank import PairDecision, ReRanker
from lit_align.probes import ConfidenceReRanker
from lit_align.probes.confidence import pair_confidence

LN3 = math.log(3.0)
# pair 0: probe agrees strongly; pair 1: undecided (γ = 0.5); pair 2: probe disagrees; pair 3: mild agreement
S_C = torch.tensor([LN3, 0.0, -LN3, 0.1])
S_R = torch.tensor([-LN3, 0.0, LN3, 0.0])
GAMMA = pair_confidence(S_C, S_R)


def run(reranker) -> PairDecision:
    return reranker({"index": torch.arange(4)}, S_C, S_R)


def test_gamma_fixture_is_what_the_tests_assume():
    assert GAMMA[0] > 0.97 and GAMMA[1] == 0.5 and GAMMA[2] < 0.03 and 0.5 < GAMMA[3] < 0.6


def test_soft_pair_weights_only():
    d = run(ConfidenceReRanker("soft", "pair"))
    assert d.confidence.tolist() == pytest.approx([GAMMA[0].item(), 0.5, 0.5, GAMMA[3].item()])
    assert not d.flip.any() and d.keep.all()
    assert ConfidenceReRanker("soft").effects() == {"confidence"}


def test_flip_pair_flips_only_the_disagreeing_pair():
    d = run(ConfidenceReRanker("flip", "pair"))
    assert d.flip.tolist() == [False, False, True, False]
    assert d.keep.all()
    assert d.confidence[2].item() == pytest.approx(1 - GAMMA[2].item())
    assert d.confidence[[0, 1, 3]].tolist() == pytest.approx(GAMMA[[0, 1, 3]].tolist())
    stats = d.stats
    assert stats["rerank/flipped_frac"] == 0.25 and stats["rerank/dropped_frac"] == 0.0
    assert stats["rerank/probe_accuracy"] == 0.5  # pairs 0 and 3 have s_c > s_r


@pytest.mark.parametrize("threshold,expected_keep", [(0.5, [True, True, False, True]), (0.6, [True, False, False, False])])
def test_drop_pair_masks_pairs_below_threshold(threshold, expected_keep):
    d = run(ConfidenceReRanker("drop", "pair", drop_threshold=threshold))
    assert d.keep.tolist() == expected_keep
    assert not d.flip.any()
    assert d.stats["rerank/dropped_frac"] == expected_keep.count(False) / 4


def test_batch_granularity_uses_one_gamma_for_all_pairs():
    # batch means: σ(s_c) = (.75 .5 .25 .525), σ(s_r) = (.25 .5 .75 .5) -> c̄ - r̄ = 0.00625
    c_bar = torch.sigmoid(S_C).mean() - 0.5
    r_bar = torch.sigmoid(S_R).mean() - 0.5
    gamma = torch.sigmoid(7.5 * (c_bar - r_bar)).item()
    d = run(ConfidenceReRanker("soft", "batch"))
    assert d.confidence.tolist() == pytest.approx([gamma] * 4)
    # the whole batch disagrees with the probe: flip flips all pairs, drop drops all
    flipped = ConfidenceReRanker("flip", "batch")({}, S_R, S_C)
    assert flipped.flip.all()
    assert flipped.confidence.tolist() == pytest.approx([gamma] * 4)
    dropped = ConfidenceReRanker("drop", "batch")({}, S_R, S_C)
    assert not dropped.keep.any()


def test_totals_resume_through_state_dict():
    reranker = ConfidenceReRanker("flip", "pair")
    run(reranker)
    run(reranker)
    state = reranker.state_dict()
    assert state["totals"]["pairs"] == 8 and state["totals"]["flipped"] == 2
    resumed = ConfidenceReRanker("flip", "pair")
    resumed.load_state_dict(state)
    d = run(resumed)
    assert d.stats["rerank/flipped_total"] == 3.0
    assert resumed.state_dict()["totals"]["batches"] == 3


def test_without_scores_there_is_no_decision():
    batch = {"index": torch.arange(2)}
    assert ConfidenceReRanker()(batch) is None and set(batch) == {"index"}
    assert ConfidenceReRanker().needs_scores and not ReRanker().needs_scores and not ReRanker().effects()


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="action='flop'"):
        ConfidenceReRanker("flop")
    with pytest.raises(ValueError, match="granularity='row'"):
        ConfidenceReRanker("soft", "row")
    with pytest.raises(ValueError, match=r"ConfidenceReRanker\(policy='flip'\): the argument is now called `action`.*write action: flip"):
        ConfidenceReRanker(policy="flip")
    with pytest.raises(ValueError, match=r"only action=drop uses drop_threshold; remove it or set action: drop"):
        ConfidenceReRanker("soft", drop_threshold=0.6)


def test_pair_decision_orients_and_averages_over_kept_pairs():
    d = PairDecision(torch.full((3,), 0.5), torch.tensor([False, True, False]), torch.tensor([True, True, False]))
    chosen, rejected = d.orient(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0]))
    assert chosen.tolist() == [1.0, 20.0, 3.0] and rejected.tolist() == [10.0, 2.0, 30.0]
    assert d.mean(torch.tensor([1.0, 5.0, 100.0])).item() == 3.0  # (1 + 5) / 2 kept pairs
    none_kept = PairDecision(torch.ones(2), torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    assert none_kept.mean(torch.tensor([4.0, 8.0])).item() == 0.0
    with pytest.raises(ValueError, match="flip and keep must be bool"):
        PairDecision(torch.ones(2), torch.zeros(2), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="one size"):
        PairDecision(torch.ones(2), torch.zeros(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
