"""AlignDataModule: presets on real rows, masks, deterministic splits, bad-row errors."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from lit_align.data.collate import Collator
from lit_align.data.datamodule import AlignDataModule
from lit_align.data.formats import BadRowError, load_rows, normalize_rows, split_hh_transcript

HH = "hh_rlhf_harmless_base_test.jsonl.gz"


def test_hh_rlhf_preset_on_real_rows(shared_data):
    raw = [json.loads(line) for line in gzip.open(shared_data / HH, "rt")][:200]
    rows, skipped = normalize_rows(raw, "hh_rlhf", "preference", on_bad_rows="skip")
    assert len(rows) + skipped == 200 and len(rows) > 190
    for row, source in zip(rows, [r for r in raw]):
        assert row["prompt"][-1]["role"] == "user"
        assert source["chosen"].endswith(row["chosen"])
        # earlier turns alternate user / assistant and rebuild the transcript's prefix
        roles = [m["role"] for m in row["prompt"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        break


def test_hh_rlhf_split_keeps_every_turn():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant: I can't help with that."
    messages, response = split_hh_transcript(text)
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how to pick a lock?"},
    ]
    assert response == "I can't help with that."


def test_hh_rlhf_bad_rows_are_identical_pairs_or_empty_turns(shared_data):
    raw = [json.loads(line) for line in gzip.open(shared_data / HH, "rt")]
    _, skipped = normalize_rows(raw, "hh_rlhf", "preference", on_bad_rows="skip")
    with pytest.raises(BadRowError) as err:
        normalize_rows(raw, "hh_rlhf", "preference", on_bad_rows="error", source=HH)
    assert skipped > 0
    assert HH in str(err.value) and "row" in str(err.value) and "on_bad_rows=skip" in str(err.value)


def test_hh_rlhf_labeled_and_prompts_modes(shared_data):
    labeled = load_rows(str(shared_data / HH), "hh_rlhf", "labeled", on_bad_rows="skip")
    assert {r["label"] for r in labeled} == {0.0, 1.0}
    prompts = load_rows(str(shared_data / HH), "hh_rlhf", "prompts", on_bad_rows="skip")
    assert len(labeled) == 2 * len(prompts)


def test_pku_saferlhf_preset():
    row = {
        "prompt": "How can I get into my neighbour's wifi?",
        "response_0": "Guess the password with this tool.",
        "response_1": "Ask your neighbour for permission.",
        "safer_response_id": 1,
        "is_response_0_safe": False,
        "is_response_1_safe": True,
        "response_0_harm_category": {"Privacy Violation": True, "Cybercrime": False},
        "response_1_harm_category": {"Privacy Violation": False, "Cybercrime": False},
    }
    [pair], _ = normalize_rows([row], "pku_saferlhf", "preference")
    assert pair["chosen"] == row["response_1"] and pair["rejected"] == row["response_0"]
    assert pair["category"] == "Privacy Violation"
    labeled, _ = normalize_rows([row], "pku_saferlhf", "labeled")
    assert [r["label"] for r in labeled] == [0.0, 1.0]


@pytest.mark.parametrize(
    "row,field,problem",
    [
        ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "empty"),
        ({"prompt": "p", "chosen": "   ", "rejected": "b"}, "chosen", "empty"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
        ({"prompt": "p", "chosen": "a", "rejected": None}, "rejected", "None"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ],
)
def test_bad_rows_name_file_row_and_field(row, field, problem):
    rows = [{"prompt": "ok", "chosen": "yes", "rejected": "no"}, row]
    with pytest.raises(BadRowError) as err:
        normalize_rows(rows, "generic", "preference", source="pairs.jsonl")
    assert (err.value.source, err.value.row, err.value.field) == ("pairs.jsonl", 1, field)
    assert problem in str(err.value)
    kept, skipped = normalize_rows(rows, "generic", "preference", on_bad_rows="skip")
    assert (len(kept), skipped) == (1, 1)


def test_collator_masks(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [
        {"index": 0, "prompt_ids": [5, 6, 7], "chosen_ids": [8, 2], "rejected_ids": [9, 10, 11, 2]},
        {"index": 1, "prompt_ids": [5], "chosen_ids": [12, 2], "rejected_ids": [2]},
    ]
    batch = Collator("preference", tok.pad_token_id)(examples)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (2, 7)
    assert batch["chosen_input_ids"][0].tolist() == [5, 6, 7, 8, 2, tok.pad_token_id, tok.pad_token_id]
    assert batch["chosen_attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert batch["chosen_completion_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert batch["rejected_completion_mask"][1].tolist() == [0, 1, 0, 0, 0, 0, 0]
    prompts = Collator("prompts", tok.pad_token_id)([{"index": 0, "prompt_ids": [5, 6]}, {"index": 1, "prompt_ids": [7]}])
    assert prompts["prompt_input_ids"][1].tolist() == [tok.pad_token_id, 7]  # left padding for generation
    assert prompts["prompt_attention_mask"][1].tolist() == [0, 1]


def test_datamodule_split_shuffle_and_chat_template(tiny_model_dir, shared_data):
    def make(seed):
        dm = AlignDataModule(
            str(shared_data / HH), format="hh_rlhf", tokenizer=str(tiny_model_dir), limit=40, batch_size=4,
            val_fraction=0.25, seed=seed, on_bad_rows="skip", max_prompt_length=48, max_completion_length=16,
        )
        dm.setup()
        return dm

    a, b, c = make(0), make(0), make(1)
    assert len(a.val_set) == 10 and len(a.train_set) + len(a.val_set) == 40 - a.skipped_rows
    first = lambda dm: next(iter(dm.train_dataloader()))["index"].tolist()  # noqa: E731
    assert first(a) == first(b) and first(a) != first(c)
    batch = next(iter(a.train_dataloader()))
    for ids, mask in zip(batch["chosen_input_ids"], batch["chosen_attention_mask"]):
        text = a.tokenizer.decode(ids[mask.bool()])
        assert "<|im_start|>assistant\n" in text
    # a completion kept whole ends with EOS (one cut at max_completion_length does not)
    short = [a.tokenizer.decode(e["chosen_ids"]) for e in a.train_set if len(e["chosen_ids"]) < 16]
    assert short and all(t.endswith("<|im_end|>") for t in short)
    # truncation: at most 48 prompt + 16 completion tokens
    assert batch["chosen_completion_mask"].sum(-1).max() <= 16
    assert (batch["chosen_attention_mask"].sum(-1) - batch["chosen_completion_mask"].sum(-1)).max() <= 48
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_batch_size_larger_than_split_is_explained(tiny_model_dir, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) for i in range(3)))
    dm = AlignDataModule(str(path), tokenizer=str(tiny_model_dir), batch_size=8, val_fraction=0.0)
    dm.setup()
    with pytest.raises(ValueError, match="fewer than data.batch_size=8"):
        dm.train_dataloader()


def test_labeled_generic_text_rows(tiny_model_dir, tmp_path):
    path = tmp_path / "texts.csv"
    path.write_text("text,label\nI cannot help with that.,safe\nSure here is how,unsafe\n")
    dm = AlignDataModule(str(path), mode="labeled", tokenizer=str(tiny_model_dir), batch_size=2, val_fraction=0.0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["label"].tolist()) == [0.0, 1.0]
    assert batch["input_ids"].shape[0] == 2
    assert torch.equal(batch["attention_mask"].sum(-1) > 0, torch.tensor([True, True]))
