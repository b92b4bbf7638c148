"""`lit-align evaluate` end to end on the tiny model: an HF directory and a real DPO checkpoint
side by side, every judge, real prompt files, cached generations."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_align.cli import main
from lit_align.data.datamodule import AlignDataModule
from lit_align.eval.evaluate import load_checkpoint_policy
from lit_align.models import LoraArgs, PolicyConfig
from lit_align.modules.dpo import DPOModule
from lit_align.probes import build_probe, extract_features
from lit_align.probes.features import encode_texts
from lit_align.probes.train import fit_probe


@pytest.fixture(scope="module")
def dpo_checkpoint(tiny_model_dir, shared_data, tmp_path_factory):
    """A LoRA DPO run of two steps; the checkpoint keeps only the adapter (the base is frozen)."""
    root = tmp_path_factory.mktemp("dpo")
    policy = PolicyConfig(name_or_path=str(tiny_model_dir), lora=LoraArgs(r=4, alpha=8))
    module = DPOModule(policy, reference="lora_base", optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2))
    data = AlignDataModule(
        str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"), format="hh_rlhf", limit=16, batch_size=4,
        max_prompt_length=64, max_completion_length=32, on_bad_rows="skip",
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(root), limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return root / "checkpoints" / "last.ckpt"


def test_checkpoint_policy_matches_trained_module(dpo_checkpoint, tiny_model_dir):
    model, tokenizer = load_checkpoint_policy(str(dpo_checkpoint))
    module = DPOModule.load_from_checkpoint(dpo_checkpoint, weights_only=True)  # Lightning's own reload
    merged = module.policy.merge_and_unload()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, merged.get_parameter(name))
        changed += not torch.equal(p, base.get_parameter(name))
    assert changed > 0, "two DPO steps with LoRA changed no merged weight"
    assert tokenizer.chat_template is not None


def test_evaluate_two_models_all_judges(dpo_checkpoint, tiny_model_dir, shared_data, tmp_path):
    # a probe on the tiny model's hidden states, fitted on harmful vs harmless instructions
    from lit_align.models import load_causal_lm, load_tokenizer

    cfg = PolicyConfig(name_or_path=str(tiny_model_dir))
    backbone, tokenizer = load_causal_lm(cfg).eval(), load_tokenizer(cfg)
    harmful = [r["instruction"] for r in json.loads((shared_data / "refusal_direction/harmful_val.json").read_text())[:16]]
    harmless = [r["instruction"] for r in json.loads((shared_data / "refusal_direction/harmless_val.json").read_text())[:16]]
    ids = encode_texts(tokenizer, harmful + harmless)
    features = extract_features(backbone, ids, [1, 2], pad_token_id=tokenizer.pad_token_id, progress=False)
    probe = build_probe("hybrid", backbone.config.hidden_size, [1, 2])
    fit_probe(probe, features, labels=torch.tensor([0.0] * 16 + [1.0] * 16), epochs=5)
    probe_path = probe.save(tmp_path / "probe.safetensors")

    out = tmp_path / "run"
    args = [
        "evaluate",
        f"--models=[{tiny_model_dir}, {dpo_checkpoint}]",
        "--names=[base, dpo]",
        "--prompt_sets=["
        f"{{preset: harmbench, path: {shared_data / 'harmbench_behaviors_text_all.csv'}, limit: 5}}, "
        f"{{preset: xstest, path: {shared_data / 'xstest_prompts.csv'}, limit: 3}}]",
        f"--out_dir={out}",
        "--judges.reward=lit_align.rewards:refusal_reward",
        f"--judges.llm_judge={tiny_model_dir}",
        f"--judges.probe={probe_path}",
        f"--judges.probe_backbone={tiny_model_dir}",
        "--sampling.max_new_tokens=6",
        "--prefill.ks=[2]",
        "--drift={}",
        "--batch_size=4",
        "--num_resamples=100",
        "--progress=false",
        "--device=cpu",
    ]
    main(args)
    report = json.loads((out / "report.json").read_text())
    assert list(report["metrics"]) == ["base", "dpo"]
    for model in ("base", "dpo"):
        harm, safe = report["metrics"][model]["harmbench"], report["metrics"][model]["xstest"]
        assert (harm["n_harmful"], harm["n_safe"], safe["n_harmful"], safe["n_safe"]) == (5, 0, 0, 3)
        assert set(harm["judges"]) == {"phrases", "reward", "llm", "probe"}
        assert "refusal_rate" in harm["judges"]["phrases"] and "compliance_rate" in safe["judges"]["llm"]
        assert "mean_score" in harm["judges"]["reward"] and "mean_confidence" in harm["judges"]["probe"]
        assert "prefill" in harm and "drift" in safe and "prefill" not in safe and "drift" not in harm
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (5 + 3)
    check_report_against_responses(report, records, out)
    md = (out / "report.md").read_text()
    assert "| metric | base | dpo |" in md
    assert (out / "bars_harmbench_phrases.png").stat().st_size > 0 and (out / "confidence_hist_probe.png").stat().st_size > 0
    assert (out / "prefill_harmbench_phrases.png").stat().st_size > 0

    # a second run re-judges the cached generations instead of generating again (the greedy
    # answers prefilled and scored for drift are base's own responses: no file of their own)
    cached = sorted(out.glob("generations/*.json"))
    assert sorted(p.name for p in cached) == sorted(
        f"{m}__{s}.json" for m in ("base", "dpo") for s in ("harmbench", "xstest", "harmbench__prefill_k2")
    )
    stamps = [p.stat().st_mtime_ns for p in cached]
    main(args)
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]


def check_report_against_responses(report: dict, records: list[dict], out) -> None:
    """Every number of report.json recomputed from the responses and verdicts written."""
    from lit_align.eval.judges import RefusalPhraseJudge

    phrases = RefusalPhraseJudge()
    for r in records:
        assert 1 <= r["length_tokens"] <= 6
        assert r["judges"]["phrases"]["refused"] == phrases.is_refusal(r["response"])  # the text judged is the text written
        assert r["judges"]["llm"]["refused"] == (r["judges"]["llm"]["confidence"] >= 0.5)
        assert 0.0 <= r["judges"]["probe"]["confidence"] <= 1.0
        assert r["judges"]["reward"]["score"] in (0.0, 1.0)
    for model, by_set in report["metrics"].items():
        for set_name, m in by_set.items():
            recs = [r for r in records if r["model"] == model and r["set"] == set_name]
            gen = json.loads((out / "generations" / f"{model}__{set_name}.json").read_text())
            assert [r["response"] for r in recs] == gen["responses"]  # written = generated
            assert [r["length_tokens"] for r in recs] == [len(ids) for ids in gen["token_ids"]]
            assert m["response_length_tokens"]["value"] == pytest.approx(sum(r["length_tokens"] for r in recs) / len(recs))
            assert m["category_counts"] == {c: sum(r["category"] == c for r in recs) for c in m["category_counts"]}
            for judge in ("phrases", "llm"):
                refused = [r["judges"][judge]["refused"] for r in recs]
                key, wanted = ("refusal_rate", refused) if set_name == "harmbench" else ("compliance_rate", [not x for x in refused])
                assert m["judges"][judge][key]["value"] == pytest.approx(sum(wanted) / len(wanted))
                for c, e in m["judges"][judge][f"{key}_by_category"].items():
                    sub = [w for w, r in zip(wanted, recs) if r["category"] == c]
                    assert (e["value"], e["n"]) == (pytest.approx(sum(sub) / len(sub)), len(sub))
            for judge, field in (("reward", "score"), ("probe", "confidence"), ("llm", "confidence")):
                values = [r["judges"][judge][field] for r in recs]
                assert m["judges"][judge][f"mean_{field}"]["value"] == pytest.approx(sum(values) / len(values))
    prefilled = [json.loads(line) for line in (out / "prefill_responses.jsonl").read_text().splitlines()]
    for model in ("base", "dpo"):
        p = report["metrics"][model]["harmbench"]["prefill"]
        recs = [r for r in prefilled if r["model"] == model]
        assert len(recs) == p["n"] == p["judges"]["phrases"]["refusal_rate_by_k"]["2"]["n"]
        rate = p["judges"]["phrases"]["refusal_rate_by_k"]["2"]["value"]
        assert rate == pytest.approx(sum(r["judges"]["phrases"]["refused"] for r in recs) / len(recs))
        d = report["metrics"][model]["xstest"]["drift"]
        drifts = [r["drift"] for r in records if r["model"] == model and r["set"] == "xstest"]
        assert d["delta"]["value"] == pytest.approx(sum(x["nll"] - x["nll_reference"] for x in drifts) / len(drifts))
    assert report["metrics"]["base"]["xstest"]["drift"]["delta"]["value"] == 0.0  # base is the reference


def test_evaluate_rejects_bad_arguments(tiny_model_dir, tmp_path):
    from lit_align.eval.evaluate import evaluate
    from lit_align.eval.prompts import PromptSetConfig

    sets = [PromptSetConfig(preset="xstest", path=str(tmp_path / "x.csv"))]
    with pytest.raises(ValueError, match="models` is empty"):
        evaluate([], sets)
    with pytest.raises(ValueError, match="names .* must be unique"):
        evaluate([str(tiny_model_dir)] * 2, sets)
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.ckpt does not exist"):
        load_checkpoint_policy(str(tmp_path / "missing.ckpt"))


def test_interrupted_generation_resumes_from_cache(tiny_model_dir, shared_data, tmp_path):
    from lit_align.eval.evaluate import load_for_eval
    from lit_align.eval.generations import _fingerprint, _generate
    from lit_align.eval.prompts import PromptSetConfig, load_prompt_set
    from lit_align.generation import LeanGenerator, SamplingConfig

    rows = load_prompt_set(PromptSetConfig(preset="xstest", path=str(shared_data / "xstest_prompts.csv"), limit=7))
    generator = LeanGenerator(*load_for_eval(str(tiny_model_dir)))
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.0)
    key = _fingerprint(str(tiny_model_dir), rows, sampling, 0, 3, "LeanGenerator")
    assert key != _fingerprint(str(tiny_model_dir), rows, sampling, 0, 3, "HFGenerator")  # another sampler, another cache
    full = _generate(generator, rows, sampling, 3, 0, False, "full", tmp_path / "full.json", key)
    assert len(full["responses"]) == 7
    # a run killed after its first batch of 3 left this cache behind
    partial = {k: (v[:3] if isinstance(v, list) else v) for k, v in full.items()}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    resumed = _generate(generator, rows, sampling, 3, 0, False, "resumed", tmp_path / "partial.json", key)
    assert resumed == full
    # another fingerprint (other settings) starts over instead of mixing generations
    other = _generate(generator, rows, sampling, 3, 0, False, "other", tmp_path / "partial.json", "another-key")
    assert other["fingerprint"] == "another-key" and len(other["responses"]) == 7

    # prefilled prompts (the prefilling attack) go through the same cache and resume alike
    from lit_align.eval.prefill import encode_prefilled

    prefilled = [{**r, "prefix_ids": ids[:2]} for r, ids in zip(rows, full["token_ids"])]
    whole = _generate(generator, prefilled, sampling, 3, 0, False, "k2", tmp_path / "k2.json", "k2", encode_prefilled)
    assert [ids[:3] for ids in whole["token_ids"]] == [ids[2:5] for ids in full["token_ids"]]  # greedy goes on
    (tmp_path / "k2_partial.json").write_text(json.dumps({k: (v[:6] if isinstance(v, list) else v) for k, v in whole.items()}))
    calls = []
    generate_ids = generator.generate_ids
    generator.generate_ids = lambda ids, *a: calls.append(len(ids)) or generate_ids(ids, *a)  # count, then generate
    resumed = _generate(generator, prefilled, sampling, 3, 0, False, "k2", tmp_path / "k2_partial.json", "k2", encode_prefilled)
    assert resumed == whole and calls == [1]  # only the last batch (1 prompt) was generated again
