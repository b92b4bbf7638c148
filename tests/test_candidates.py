"""Candidate re-ranking: the probe's best and worst candidates become chosen and rejected."""

import gzip
import json

import pytest
import torch

from lit_align.cli import main
from lit_align.data.formats import BadRowError, split_hh_transcript
from lit_align.generation import LeanGenerator, SamplingConfig
from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer
from lit_align.probes import HybridProbe
from lit_align.probes.candidates import ProbeScorer, build_pairs, select_pairs


def test_select_pairs_top_and_bottom():
    scores = [0.1, 2.0, -1.0, 0.5, 1.0]
    assert select_pairs(scores) == [(1, 2)]
    assert select_pairs(scores, 2) == [(1, 2), (4, 0)]
    with pytest.raises(ValueError, match="3 pair\\(s\\) per prompt need at least 6 candidates, got 5"):
        select_pairs(scores, 3)


def test_build_pairs_skips_identical_texts_and_ties():
    rows = [{"prompt": "p1"}, {"prompt": "p2"}, {"prompt": "p3"}]
    candidates = [["a", "b", "c"], ["same", "same "], ["x", "y"]]
    scores = [[0.0, 1.0, -1.0], [1.0, 0.0], [0.3, 0.3]]
    pairs, skipped = build_pairs(rows, candidates, scores)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "c")]
    assert skipped == {"identical": 1, "small_margin": 1}


@pytest.fixture(scope="module")
def probe_file(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(0)
    probe = HybridProbe(32, [1, 2])
    with torch.no_grad():
        probe.weight.normal_()
        probe.vote.weight.normal_()
    return probe.save(tmp_path_factory.mktemp("probe") / "probe.safetensors")


def hh_candidates(shared_data, n):
    """Real prompts with two real candidate replies each (HH-RLHF chosen and rejected)."""
    rows = []
    with gzip.open(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz", "rt") as f:
        for line in f:
            raw = json.loads(line)
            messages, chosen = split_hh_transcript(raw["chosen"])
            _, rejected = split_hh_transcript(raw["rejected"])
            if chosen and rejected and chosen != rejected and len(messages) == 1:
                rows.append({"prompt": messages[0]["content"], "candidates": [chosen, rejected, chosen + " Okay."]})
            if len(rows) == n:
                return rows


def test_rerank_candidates_column(shared_data, tiny_model_dir, probe_file, tmp_path, capsys):
    rows = hh_candidates(shared_data, 5)
    data = tmp_path / "candidates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    main(["rerank-candidates", f"--data={data}", f"--probe={probe_file}", f"--policy.name_or_path={tiny_model_dir}", f"--output={out}"])
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == 5
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # 5 prompts x 3 candidates, all scored
    assert summary == {"prompts": 5, "candidates": 15, "pairs": 5, "skipped": {"identical": 0, "small_margin": 0}, "output": str(out)}
    # score each candidate on its own (batch of one) and check the choice
    cfg = PolicyConfig(name_or_path=str(tiny_model_dir))
    scorer = ProbeScorer.from_files(cfg, probe_file, progress=False)
    for row, pair in zip(rows, pairs):
        scores = [scorer([row["prompt"]], [c])[0] for c in row["candidates"]]
        assert pair["chosen"] == row["candidates"][max(range(3), key=scores.__getitem__)]
        assert pair["rejected"] == row["candidates"][min(range(3), key=scores.__getitem__)]
        assert pair["chosen_score"] == pytest.approx(max(scores), abs=1e-4)
        assert pair["prompt"] == [{"role": "user", "content": row["prompt"]}]


def test_rerank_candidates_samples_once_from_the_policy(shared_data, tiny_model_dir, probe_file, tmp_path):
    harmful = json.loads((shared_data / "refusal_direction" / "harmful_val.json").read_text())[:3]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["instruction"], "category": r["category"]}) + "\n" for r in harmful))
    out = tmp_path / "pairs.jsonl"
    main([
        "rerank-candidates", f"--data={data}", f"--probe={probe_file}", f"--policy.name_or_path={tiny_model_dir}",
        f"--output={out}", "--num_candidates=4", "--pairs_per_prompt=2",
        '--sampling={"max_new_tokens": 8, "temperature": 1.0}', "--seed=3",
    ])
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    # the same seeded sampling reproduces the candidates the command scored
    cfg = PolicyConfig(name_or_path=str(tiny_model_dir))
    generator = LeanGenerator(load_causal_lm(cfg), load_tokenizer(cfg))
    texts = generator.generate([r["instruction"] for r in harmful], SamplingConfig(max_new_tokens=8), 4, 8, seed=3, progress=False)
    assert 1 <= len(pairs) <= 6
    for pair in pairs:
        i = [r["instruction"] for r in harmful].index(pair["prompt"][0]["content"])
        assert pair["chosen"] in texts[4 * i : 4 * i + 4] and pair["rejected"] in texts[4 * i : 4 * i + 4]
        assert pair["chosen_score"] > pair["rejected_score"] and pair["category"] == harmful[i]["category"]


def test_bad_candidates_name_the_file_row_and_field(tiny_model_dir, probe_file, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "candidates": ["a", "b"]}) + "\n" + json.dumps({"prompt": "yo", "candidates": ["only one"]}) + "\n")
    args = ["rerank-candidates", f"--data={data}", f"--probe={probe_file}", f"--policy.name_or_path={tiny_model_dir}", f"--output={tmp_path / 'o.jsonl'}"]
    with pytest.raises(BadRowError, match=r"bad.jsonl, row 1, field 'candidates': has 1 candidates, fewer than the 2 needed"):
        main(args)
    main(args + ["--on_bad_rows=skip"])
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 1
