"""Online-sampling DPO: each step's pairs are the probe's best and worst of k answers the current
policy samples, and DPO trains on exactly those pairs."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from lit_align.data.datamodule import AlignDataModule
from lit_align.generation import LeanGenerator, SamplingConfig
from lit_align.losses.dpo import sft_loss
from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer
from lit_align.modules.online_dpo import OnlineDPOModule, pick_pairs
from lit_align.probes import HybridProbe, load_probe, select_features

SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.0)


def test_pick_pairs_takes_best_and_worst_and_leaves_out_ties_and_identical_texts():
    prompts = [[1], [2], [3], [4]]
    candidates = [[5], [6], [7], [8], [9], [9], [9], [9], [4], [4, 4], [4], [3], [4], [4], [5], [4]]
    scores = torch.tensor([[0.1, 2.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0], [0.3, 0.9, 0.2, 0.9], [0.3, 0.9, 0.2, 0.1]])
    picked, left_out = pick_pairs(prompts, candidates, scores)
    # prompt 0: best 1, worst 2; prompt 1: every score alike; prompt 2: best 9 (first max), worst 10;
    # prompt 3: best 13 and worst 15 have the same text
    assert picked == [(0, 1, 2), (2, 9, 10)]
    assert left_out == {"identical": 1, "small_margin": 1}
    picked, left_out = pick_pairs(prompts, candidates, scores, min_margin=1.0)
    assert picked == [(0, 1, 2)] and left_out == {"identical": 0, "small_margin": 3}  # margins 0.7 and 0.8 ≤ 1
    with pytest.raises(ValueError, match="4 prompts and 15 candidates"):
        pick_pairs(prompts, candidates[:-1], scores)


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory):
    torch.manual_seed(0)
    probe = HybridProbe(32, [1, 2])
    with torch.no_grad():
        probe.weight.normal_(std=0.5)
        probe.vote.weight.normal_()
    return str(probe.save(tmp_path_factory.mktemp("probe") / "probe.safetensors"))


@pytest.fixture(scope="module")
def prompts_file(shared_data, tmp_path_factory):
    harmful = json.loads((shared_data / "refusal_direction" / "harmful_train.json").read_text())[:2]
    harmless = json.loads((shared_data / "refusal_direction" / "harmless_train.json").read_text())[:2]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["instruction"]}) + "\n" for r in harmful + harmless))
    return str(path)


def make_module(tiny_model_dir, probe_file, **kwargs):
    defaults = dict(
        num_candidates=4, sampling=SAMPLING, sampling_seed=3, loss_type="sigmoid", sft_weight=1.0, reference="copy",
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    return OnlineDPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), probe_file, **{**defaults, **kwargs})


def make_data(prompts_file, mode="prompts", **kwargs):
    return AlignDataModule(prompts_file, mode=mode, batch_size=2, val_fraction=0.0, max_prompt_length=48, **kwargs)


def trainer(tmp_path, callbacks, **kwargs):
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), num_sanity_val_steps=0, callbacks=callbacks, log_every_n_steps=1, **kwargs,
    )


class Recorder(L.Callback):
    """The weights each step starts from, its prompts, seed and the pairs the module built."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append({
            "weights": {k: v.detach().clone() for k, v in module.policy.state_dict().items()},
            "ids": batch["prompt_input_ids"].clone(), "mask": batch["prompt_attention_mask"].clone(),
            "seed": module.batch_seed(trainer.current_epoch, batch_idx), "epoch": trainer.current_epoch,
        })

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[-1].update({**module.last_pairs, "loss": float(outputs["loss"])})


def test_online_pairs_come_from_the_current_policy_every_epoch_and_train(tiny_model_dir, probe_file, prompts_file, tmp_path):
    torch.set_num_threads(1)
    module = make_module(tiny_model_dir, probe_file)
    recorder = Recorder()
    data = make_data(prompts_file, val_path=prompts_file)
    t = trainer(tmp_path, [recorder], max_epochs=2, limit_val_batches=1)
    t.fit(module, datamodule=data)
    assert len(recorder.steps) == 4 and [s["epoch"] for s in recorder.steps] == [0, 0, 1, 1]

    tokenizer = load_tokenizer(PolicyConfig(name_or_path=str(tiny_model_dir)))
    probe = load_probe(probe_file)
    fresh = load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir))).eval()
    k = 4
    for step in recorder.steps:
        fresh.load_state_dict(step["weights"])
        # the candidates are what the weights of that very step sample with the batch's seed
        again = LeanGenerator(fresh, tokenizer).generate_ids(step["ids"], step["mask"], SAMPLING, k, step["seed"])
        assert [c[: int(m.sum())].tolist() for c, m in zip(again.completion_ids, again.completion_mask)] == step["candidates"]
        # scored one by one on those weights' hidden states, the probe's best is chosen and its worst rejected
        prompts = [row[m.bool()].tolist() for row, m in zip(step["ids"], step["mask"])]
        scores = []
        for j, cand in enumerate(step["candidates"]):
            ids = torch.tensor([prompts[j // k] + cand])
            with torch.no_grad():
                hidden = fresh(input_ids=ids, output_hidden_states=True).hidden_states
                scores.append(float(probe(select_features(hidden, torch.ones_like(ids), probe.layers))))
        scores = torch.tensor(scores).view(len(prompts), k)
        torch.testing.assert_close(step["scores"], scores, atol=1e-4, rtol=1e-4)
        expected = [(step["index"][i], i * k + int(scores[i].argmax()), i * k + int(scores[i].argmin())) for i in range(len(prompts))]
        assert step["pairs"] == [p for p in expected if step["candidates"][p[1]] != step["candidates"][p[2]]]
        assert step["pairs"], "the tiny model's samples differ: every prompt gives a pair"

    # re-sampled each epoch from the trained weights: each prompt's candidates differ between epochs
    by_prompt = {}
    for step in recorder.steps:
        for i, index in enumerate(step["index"]):
            by_prompt.setdefault(index, []).append(step["candidates"][i * k : (i + 1) * k])
    assert len(by_prompt) == 4 and all(len(v) == 2 and v[0] != v[1] for v in by_prompt.values())
    assert not torch.equal(recorder.steps[0]["weights"]["model.embed_tokens.weight"], recorder.steps[2]["weights"]["model.embed_tokens.weight"])

    # DPO trained on those pairs: at step 0 policy = reference, so the loss is log 2 + the chosen answers' NLL
    first = recorder.steps[0]
    fresh.load_state_dict(first["weights"])
    logps, lengths = [], []
    for index, w, _ in first["pairs"]:
        i = first["index"].index(index)
        prompt = first["ids"][i][first["mask"][i].bool()].tolist()
        ids = torch.tensor([prompt + first["candidates"][w]])
        with torch.no_grad():
            logits = fresh(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        logps.append(logits.gather(1, ids[0, len(prompt):, None]).sum())
        lengths.append(len(first["candidates"][w]))
    expected_loss = math.log(2) + float(sft_loss(torch.stack(logps), torch.tensor(lengths)))
    assert first["loss"] == pytest.approx(expected_loss, abs=1e-4)

    # the sampled tokens are counted (training only: validation sampled too, and is not counted)
    assert module.generated_tokens == sum(len(c) for s in recorder.steps for c in s["candidates"])
    assert float(t.callback_metrics["online/generated_tokens"]) == module.generated_tokens
    assert "eval_loss" in t.callback_metrics


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampling=SamplingConfig(temperature=0.0)), "temperature=0 is greedy"),
        (dict(reference="cached"), "reference='cached' stores reference log-probs of fixed pairs"),
        (dict(co_train_probe=True), "co_train_probe would train the probe on the pairs' labels"),
        (dict(num_candidates=1), "num_candidates=1"),
    ],
)
def test_online_dpo_refuses_settings_that_cannot_work(tiny_model_dir, probe_file, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(tiny_model_dir, probe_file, **kwargs)


def test_online_dpo_stops_on_a_probe_that_scores_everything_alike(tiny_model_dir, prompts_file, tmp_path):
    untrained = str(HybridProbe(32, [1, 2]).save(tmp_path / "untrained.safetensors"))  # zero weights: every score 0
    with pytest.raises(ValueError, match="gives every candidate of the batch the same score"):
        trainer(tmp_path, [], max_steps=1, limit_val_batches=0).fit(make_module(tiny_model_dir, untrained), datamodule=make_data(prompts_file))


def test_online_dpo_needs_prompts_mode(tiny_model_dir, probe_file, shared_data, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match="set data.mode: prompts"):
        trainer(tmp_path, [], max_steps=1, limit_val_batches=0).fit(make_module(tiny_model_dir, probe_file), datamodule=make_data(str(pairs), mode="preference"))


def test_online_dpo_with_lora_samples_and_scores_through_the_adapters(tiny_model_dir, probe_file, prompts_file, tmp_path):
    """LoRA policy, the base (adapters off) as reference: the sampler and the probe read the adapted model."""
    from lit_align.models import LoraArgs

    policy = PolicyConfig(name_or_path=str(tiny_model_dir), lora=LoraArgs(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    module = OnlineDPOModule(
        policy, probe_file, num_candidates=4, sampling=SAMPLING, sampling_seed=0, reference="lora_base", sft_weight=1.0,
        export_dir=str(tmp_path / "export"), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2),
    )
    recorder = Recorder()
    trainer(tmp_path, [recorder], max_steps=3, limit_val_batches=0).fit(module, datamodule=make_data(prompts_file))
    lora = {k: v for k, v in recorder.steps[2]["weights"].items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # B starts at zero: the adapters trained
    # step 2's candidates are what the adapted weights of step 2 sample (merged into a plain model to check)
    fresh = load_causal_lm(policy)
    fresh.load_state_dict(recorder.steps[2]["weights"])
    merged = fresh.merge_and_unload().eval()
    step = recorder.steps[2]
    again = LeanGenerator(merged, load_tokenizer(policy)).generate_ids(step["ids"], step["mask"], SAMPLING, 4, step["seed"])
    assert [c[: int(m.sum())].tolist() for c, m in zip(again.completion_ids, again.completion_mask)] == step["candidates"]
    assert (tmp_path / "export" / "config.json").is_file() and module.generated_tokens > 0
