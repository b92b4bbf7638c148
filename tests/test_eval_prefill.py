"""The prefilling attack on the tiny model: the k prefilled tokens sit right after the generation
prompt, a prefill of the model's own greedy answer reproduces the rest of it, the report's
rates are the verdicts written, and bad answer files stop with file, row and field."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lit_align.data.render import encode_prompt
from lit_align.eval.evaluate import evaluate, load_for_eval
from lit_align.eval.prefill import PrefillConfig, encode_prefilled
from lit_align.eval.prompts import PromptSetConfig, load_prompt_set
from lit_align.generation import LeanGenerator, SamplingConfig
from lit_align.testing import teach_canned_responses

REFUSAL = "I cannot help with that, sorry."
COMPLY = "Sure, here is a step by step guide: first gather the materials, then follow the instructions."
FAST = dict(batch_size=4, num_resamples=200, progress=False, device="cpu")


def harmbench(shared_data, limit=6) -> PromptSetConfig:
    return PromptSetConfig(preset="harmbench", path=str(shared_data / "harmbench_behaviors_text_all.csv"), limit=limit)


def xstest(shared_data, limit=3) -> PromptSetConfig:
    return PromptSetConfig(preset="xstest", path=str(shared_data / "xstest_prompts.csv"), limit=limit)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy 2-core machine two threads
    wait on each other (teaching the canned model: 157 s with 2 threads, 9 s with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def canned_dir(tiny_model_dir, shared_data, tmp_path_factory):
    """The tiny model taught to refuse the first two of six HarmBench prompts and to answer the
    other four with a long compliant answer."""
    rows = load_prompt_set(harmbench(shared_data))
    examples = [(r["prompt"], REFUSAL if i < 2 else COMPLY) for i, r in enumerate(rows)]
    return teach_canned_responses(tiny_model_dir, tmp_path_factory.mktemp("canned"), examples, steps=80)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prefix_ids_follow_the_generation_prompt(tiny_model_dir):
    model, tokenizer = load_for_eval(str(tiny_model_dir), device="cpu")
    generator = LeanGenerator(model, tokenizer)
    rows = [{"prompt": "Hi", "prefix_ids": [7, 8, 9]}, {"prompt": "A much longer prompt than the first", "prefix_ids": [4, 5, 6]}]
    ids, mask = encode_prefilled(generator, rows)
    for row, r_ids, r_mask in zip(rows, ids, mask):
        kept = r_ids[r_mask.bool()].tolist()
        # the chat template's prompt, generation prompt included, then exactly the k prefix ids
        assert kept == encode_prompt(tokenizer, row["prompt"]) + row["prefix_ids"]
        assert r_mask[-3:].tolist() == [1, 1, 1]
    assert mask[0, 0] == 0  # still left-padded: every row ends with its prefix


def test_prefill_of_own_answer_goes_on_token_for_token(tiny_model_dir, shared_data, tmp_path):
    """The random tiny model's greedy answers are no canonical tokenization (decoding and
    re-encoding them gives other ids), so only prefix ids taken as generated reproduce them."""
    metrics = evaluate(
        models=[str(tiny_model_dir)], names=["tiny"], prompt_sets=[harmbench(shared_data, 4)], out_dir=str(tmp_path),
        sampling=SamplingConfig(max_new_tokens=10, temperature=0.0), prefill=PrefillConfig(ks=[3, 7], keep_answers="all"),
        **FAST,
    )  # fmt: skip
    tokenizer = load_for_eval(str(tiny_model_dir), device="cpu")[1]
    answers = json.loads((tmp_path / "generations" / "tiny__harmbench.json").read_text())["token_ids"]
    assert any(tokenizer(tokenizer.decode(a), add_special_tokens=False)["input_ids"] != a for a in answers)
    assert metrics["tiny"]["harmbench"]["prefill"]["n"] == 4
    for k in (3, 7):
        continued = json.loads((tmp_path / "generations" / f"tiny__harmbench__prefill_k{k}.json").read_text())["token_ids"]
        assert [c[: 10 - k] for c in continued] == [a[k:] for a in answers]


def test_prefill_attack_end_to_end(canned_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    metrics = evaluate(
        models=[str(canned_dir)], names=["canned"], prompt_sets=[harmbench(shared_data)], out_dir=str(out),
        sampling=SamplingConfig(max_new_tokens=40, temperature=0.0), prefill=PrefillConfig(ks=[2, 8]), **FAST,
    )  # fmt: skip
    plain = {r["id"]: r for r in read_jsonl(out / "responses.jsonl")}
    main = json.loads((out / "generations" / "canned__harmbench.json").read_text())
    answer_ids = dict(zip(plain, main["token_ids"]))
    refused = {i for i, r in plain.items() if r["judges"]["phrases"]["refused"]}
    assert 1 <= len(refused) < len(plain)  # the canned model refuses some prompts, complies with others
    p = metrics["canned"]["harmbench"]["prefill"]
    # answers the judge calls refusals are no attack: left out and counted
    assert p["skipped"] == {"answer is a refusal": len(refused)}
    assert (p["n_prompts"], p["n"]) == (6, 6 - len(refused))
    attacked = [i for i in plain if i not in refused]

    records = read_jsonl(out / "prefill_responses.jsonl")
    assert sorted({r["k"] for r in records}) == [2, 8]
    tokenizer = load_for_eval(str(canned_dir), device="cpu")[1]
    for k in (2, 8):
        recs = {r["id"]: r for r in records if r["k"] == k}
        assert sorted(recs) == sorted(attacked)
        cached = json.loads((out / "generations" / f"canned__harmbench__prefill_k{k}.json").read_text())
        for i, continuation in zip(recs, cached["token_ids"]):
            answer = answer_ids[i]
            assert len(answer) < 40 and answer[-1] == tokenizer.eos_token_id  # a whole answer, EOS included
            # the model's own greedy answer, prefilled with its first k tokens, goes on with tokens k+1...
            assert continuation == answer[k:]
            assert recs[i]["prefix"] == tokenizer.decode(answer[:k])
            assert recs[i]["prefix"] + recs[i]["response"] == plain[i]["response"]
        # the report's rate is the fraction of refusals among the continuations written
        rate = p["judges"]["phrases"]["refusal_rate_by_k"][str(k)]
        assert rate["n"] == len(attacked)
        assert rate["value"] == pytest.approx(sum(r["judges"]["phrases"]["refused"] for r in recs.values()) / len(attacked))
    # k = 0: the plain responses to the same prompts (all compliant, as their answers are)
    assert p["judges"]["phrases"]["refusal_rate_by_k"]["0"]["value"] == 0.0
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["canned"]["harmbench"]["prefill"] == p
    assert (out / "prefill_harmbench_phrases.png").stat().st_size > 5000
    assert "### harmbench: prefilling attack" in (out / "report.md").read_text()


def write_answers(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_answers_file_prefixes_and_bad_rows(tiny_model_dir, shared_data, tmp_path):
    rows = load_prompt_set(harmbench(shared_data, limit=3))
    tokenizer = load_for_eval(str(tiny_model_dir), device="cpu")[1]
    long_answer = "Here is a step by step guide: first gather the materials, then follow the instructions."
    run = dict(models=[str(tiny_model_dir)], names=["tiny"], prompt_sets=[harmbench(shared_data, limit=3)],
               sampling=SamplingConfig(max_new_tokens=4, temperature=0.0), **FAST)  # fmt: skip

    # matched by prompt text: the prefix is the first k tokens of the tokenized answer
    by_prompt = write_answers(tmp_path / "by_prompt.jsonl", [{"prompt": r["prompt"], "response": long_answer} for r in rows])
    evaluate(**run, out_dir=str(tmp_path / "ok"), prefill=PrefillConfig(ks=[3], answers_file=str(by_prompt)))
    prefixes = {r["prefix"] for r in read_jsonl(tmp_path / "ok" / "prefill_responses.jsonl")}
    assert prefixes == {tokenizer.decode(tokenizer(long_answer, add_special_tokens=False)["input_ids"][:3])}

    bad = write_answers(tmp_path / "bad.jsonl", [
        {"id": rows[0]["id"], "response": long_answer},
        {"id": rows[1]["id"], "response": "Sure."},  # shorter than k
        {"id": "no_such_file.csv:3", "response": long_answer},  # unknown prompt
        {"id": rows[0]["id"], "response": ""},  # empty (and a second row for rows[0])
    ])  # rows[2] has no answer  # fmt: skip
    cfg = PrefillConfig(ks=[2, 12], answers_file=str(bad))
    with pytest.raises(ValueError, match=r"bad.jsonl row 2: field 'id': 'no_such_file.csv:3' is no prompt of the prefill sets"):
        evaluate(**run, out_dir=str(tmp_path / "e1"), prefill=cfg)
    two = write_answers(tmp_path / "two.jsonl", [{"id": r["id"], "response": long_answer} for r in rows[:2]])
    with pytest.raises(ValueError, match=rf"no answer for prompt '{re.escape(rows[2]['id'])}' .*field 'response' is missing"):
        evaluate(**run, out_dir=str(tmp_path / "e2"), prefill=PrefillConfig(ks=[2, 12], answers_file=str(two)))
    complete = write_answers(tmp_path / "short.jsonl", [{"id": r["id"], "response": "Sure." if i == 1 else long_answer} for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match=r"short.jsonl row 1: field 'response' has \d tokens, fewer than k = 12"):
        evaluate(**run, out_dir=str(tmp_path / "e3"), prefill=PrefillConfig(ks=[2, 12], answers_file=str(complete)))

    # on_bad_rows: skip counts every bad row and attacks the one prompt left
    skip = PrefillConfig(ks=[2, 12], answers_file=str(bad), on_bad_rows="skip")
    metrics = evaluate(**run, out_dir=str(tmp_path / "skip"), prefill=skip)
    p = metrics["tiny"]["harmbench"]["prefill"]
    assert p["skipped"] == {"answer shorter than 12 tokens": 1, "no answer": 1} and p["n"] == 1
    meta = json.loads((tmp_path / "skip" / "report.json").read_text())["meta"]
    assert meta["prefill"]["answers_file_rows_skipped"] == {"unknown prompt": 1, "empty answer": 1}


def test_options_that_cannot_act_stop_at_setup(tiny_model_dir, shared_data, tmp_path):
    from lit_align.eval.drift import DriftConfig
    from lit_align.eval.evaluate import JudgesConfig

    tiny = str(tiny_model_dir)
    safe_only = dict(models=[tiny], prompt_sets=[xstest(shared_data)], out_dir=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="prefill: no prompt set has harmful prompts"):
        evaluate(**safe_only, prefill=PrefillConfig())
    both = dict(models=[tiny], prompt_sets=[harmbench(shared_data, 3), xstest(shared_data)], out_dir=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="prefill.sets: no prompt set named 'advbench'"):
        evaluate(**both, prefill=PrefillConfig(sets=["advbench"]))
    with pytest.raises(ValueError, match="prefill.sets: 'xstest' has no harmful prompts"):
        evaluate(**both, prefill=PrefillConfig(sets=["xstest"]))
    for ks in ([], [0, 5], [5, 5]):
        with pytest.raises(ValueError, match=r"prefill.ks="):
            evaluate(**both, prefill=PrefillConfig(ks=ks))
    with pytest.raises(ValueError, match="answers_file or answers_from, not both"):
        evaluate(**both, prefill=PrefillConfig(answers_file=str(tmp_path / "a.jsonl"), answers_from=tiny))
    with pytest.raises(FileNotFoundError, match="prefill.answers_file .*missing.jsonl does not exist"):
        evaluate(**both, prefill=PrefillConfig(answers_file=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="prefill: no judge gives refusal verdicts"):
        evaluate(**both, prefill=PrefillConfig(), judges=JudgesConfig(phrases=None, reward="lit_align.rewards:refusal_reward"))
    with pytest.raises(ValueError, match="drift compares models with a reference model"):
        evaluate(**both, drift=DriftConfig())
    two = dict(both, models=[tiny, tiny], names=["a", "b"])
    with pytest.raises(ValueError, match="drift: no prompt set has safe prompts"):
        evaluate(**dict(two, prompt_sets=[harmbench(shared_data, 3)]), drift=DriftConfig())
    with pytest.raises(ValueError, match="drift.sets: 'harmbench' has no safe prompts"):
        evaluate(**two, drift=DriftConfig(sets=["harmbench"]))
    assert not list(tmp_path.glob("generations/*")), "nothing is generated before the set-up checks pass"

