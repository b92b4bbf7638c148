"""Drift on benign prompts on the tiny model: a model against itself drifts by exactly 0, the
per-prompt NLL equals a by-hand forward pass, Δ's interval is paired per prompt."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_align.data.render import encode_prompt
from lit_align.eval.drift import DriftConfig
from lit_align.eval.evaluate import evaluate, model_label
from lit_align.eval.metrics import estimate
from lit_align.eval.prompts import PromptSetConfig
from lit_align.generation import SamplingConfig
from lit_align.testing import make_tiny_model

RUN = dict(sampling=SamplingConfig(max_new_tokens=10, temperature=0.0), batch_size=2, num_resamples=200, progress=False, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; a second thread only waits on a busy machine
    yield
    torch.set_num_threads(previous)


def sets(shared_data, safe=3, harmful=0):
    out = [PromptSetConfig(preset="xstest", path=str(shared_data / "xstest_prompts.csv"), limit=safe)]
    if harmful:
        out.append(PromptSetConfig(preset="harmbench", path=str(shared_data / "harmbench_behaviors_text_all.csv"), limit=harmful))
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_drift_of_a_model_against_itself_is_zero(tiny_model_dir, shared_data, tmp_path):
    tiny = str(tiny_model_dir)
    metrics = evaluate(models=[tiny, tiny], names=["a", "b"], prompt_sets=sets(shared_data, 4, 2),
                       out_dir=str(tmp_path), drift=DriftConfig(), **RUN)  # fmt: skip
    for name in ("a", "b"):  # b is loaded anew: the same weights give the same NLLs, to the bit
        d = metrics[name]["xstest"]["drift"]
        assert d["delta"] == {"value": 0.0, "low": 0.0, "high": 0.0, "n": 4}
        assert d["nll"] == d["nll_reference"] and d["nll"]["value"] > 0
        assert d["reference"] == "a"
        assert "drift" not in metrics[name]["harmbench"]  # no safe prompts there


def test_drift_by_hand(tiny_model_dir, shared_data, tmp_path):
    tiny, other = str(tiny_model_dir), str(make_tiny_model(tmp_path / "other", seed=1))
    out = tmp_path / "run"
    metrics = evaluate(models=[tiny, other], names=["base", "other"], prompt_sets=sets(shared_data, 5),
                       out_dir=str(out), drift=DriftConfig(), **RUN)  # fmt: skip
    records = read_jsonl(out / "responses.jsonl")
    base_answers = json.loads((out / "generations" / "base__xstest.json").read_text())["token_ids"]
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    base_records = [r for r in records if r["model"] == "base"]
    # the scored answers are the base model's own responses, EOS included where it stopped
    assert [tokenizer.decode(a, skip_special_tokens=True) for a in base_answers] == [r["response"] for r in base_records]

    other_records = [r for r in records if r["model"] == "other"]
    for path, key in ((other, "nll"), (tiny, "nll_reference")):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        for record, answer in zip(other_records, base_answers):
            prompt = encode_prompt(tokenizer, record["prompt"])  # one prompt, no padding
            with torch.no_grad():
                logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            by_hand = -logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None]).mean().item()
            assert record["drift"][key] == pytest.approx(by_hand, rel=1e-5)
    d = metrics["other"]["xstest"]["drift"]
    deltas = [r["drift"]["nll"] - r["drift"]["nll_reference"] for r in other_records]
    paired = estimate(deltas, num_resamples=200, seed=0)
    assert d["delta"] == pytest.approx(paired.as_dict())  # bootstrap over prompts of the per-prompt differences
    assert abs(d["delta"]["value"]) > 0.01  # other weights: the answers are not equally likely
    assert d["n"] == 5 and d["answer_tokens"] == sum(map(len, base_answers))

    # the reference need not be evaluated itself: it is loaded first, only for its answers
    alone = evaluate(models=[other], names=["other"], prompt_sets=sets(shared_data, 5), out_dir=str(out),
                     drift=DriftConfig(reference=tiny), **RUN)  # fmt: skip
    assert alone["other"]["xstest"]["drift"] | {"reference": None} == d | {"reference": None}
    assert alone["other"]["xstest"]["drift"]["reference"] == f"reference_{model_label(tiny)}"
    assert list(alone) == ["other"]


def test_drift_needs_the_reference_tokenizer(tiny_model_dir, shared_data, tmp_path):
    small = str(make_tiny_model(tmp_path / "small_vocab", vocab_size=300))
    with pytest.raises(ValueError, match="drift: model 'small' has another tokenizer than the reference 'base'"):
        evaluate(models=[str(tiny_model_dir), small], names=["base", "small"], prompt_sets=sets(shared_data, 2),
                 out_dir=str(tmp_path / "run"), drift=DriftConfig(), **RUN)  # fmt: skip
    assert not (tmp_path / "run" / "generations" / "small__xstest.json").exists()  # stopped before generating
