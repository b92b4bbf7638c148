"""Every file in tests/bad_inputs/ (and a few bad artefacts built here) gets a clear error naming
the file, row and field, with what to do, or a counted skip when on_bad_rows="skip"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lit_align.data.datamodule import AlignDataModule
from lit_align.data.formats import BadRowError, load_rows, load_source, normalize_rows

BAD = Path(__file__).resolve().parent / "bad_inputs"
ROOT = Path(__file__).resolve().parents[1]

# file, format, mode, bad row, field, problem, rows kept when skipping
ROW_ERRORS = [
    ("missing_column.jsonl", "generic", "preference", 2, "rejected", "is None (missing or null; columns: ['chosen', 'prompt', 'rejected'])", 3),
    ("renamed_column.jsonl", "generic", "preference", 0, "prompt", "missing (columns: ['chosen', 'question', 'rejected'])", 0),
    ("none_value.jsonl", "generic", "preference", 1, "chosen", "is None", 2),
    ("empty_string.jsonl", "generic", "preference", 1, "rejected", "is empty", 2),
    ("whitespace_only.jsonl", "generic", "preference", 2, "prompt", "is empty", 2),
    ("non_string.jsonl", "generic", "preference", 0, "chosen", "expected a string, got int", 0),
    ("identical_pair.jsonl", "generic", "preference", 1, "rejected", "identical to chosen", 2),
    ("duplicate_ids.jsonl", "generic", "preference", 2, "id", "duplicate id 'a1' (first seen in row 0)", 2),
    ("bad_label.jsonl", "generic", "labeled", 1, "label", "expected a safe/unsafe label", 1),
    ("not_a_transcript.jsonl", "hh_rlhf", "preference", 0, "chosen", "not an HH-RLHF transcript", 0),
    ("pku_bad_safer_id.jsonl", "pku_saferlhf", "preference", 0, "safer_response_id", "expected 0 or 1, got 2", 0),
    ("bad_message_role.jsonl", "generic", "preference", 0, "prompt", "messages need a role and string content", 0),
    ("missing_column.csv", "generic", "preference", 0, "rejected", "missing (columns: ['chosen', 'prompt'])", 0),
    ("system_only_prompt.jsonl", "generic", "preference", 1, "prompt", "the prompt has no user turn (roles: ['system'])", 2),
]


@pytest.mark.parametrize("name,format,mode,row,field,problem,kept", ROW_ERRORS, ids=[c[0] for c in ROW_ERRORS])
def test_bad_row_is_named_or_skipped_and_counted(name, format, mode, row, field, problem, kept, caplog):
    path = str(BAD / name)
    with pytest.raises(BadRowError) as err:
        load_rows(path, format, mode)
    assert (err.value.source, err.value.row, err.value.field) == (path, row, field)
    assert problem in str(err.value) and "on_bad_rows=skip" in str(err.value)  # what to do
    rows, skipped = normalize_rows(load_source(path), format, mode, on_bad_rows="skip", source=path)
    assert skipped >= 1 and len(rows) == kept * (2 if mode == "labeled" and format != "generic" else 1)
    assert f"skipped {skipped} bad rows" in caplog.text
    if kept == 0:
        with pytest.raises(ValueError, match=f"{path}: no usable rows"):
            load_rows(path, format, mode, on_bad_rows="skip")


FILE_ERRORS = [
    ("invalid_json.jsonl", ValueError, "line 3, column 46: invalid JSON (Expecting value); each line must be one JSON object"),
    ("not_gzip.jsonl.gz", ValueError, "not a valid compressed file (Not a gzipped file"),
    ("latin1.jsonl", ValueError, "row 1: text is not UTF-8"),
    ("empty.jsonl", ValueError, "the file is empty"),
    ("pairs.txt", ValueError, "unknown file type; use .json, .jsonl(.gz), .csv or .parquet"),
    ("no_such_file.jsonl", FileNotFoundError, "data file not found"),
]


@pytest.mark.parametrize("name,error,message", FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_unreadable_file_is_named_with_line_and_cause(name, error, message):
    path = str(BAD / name)
    for on_bad_rows in ("error", "skip"):  # a broken file is never silently skipped
        with pytest.raises(error) as err:
            load_rows(path, on_bad_rows=on_bad_rows)
        assert path in str(err.value) and message in str(err.value)


def test_split_smaller_than_batch_size(tiny_model_dir):
    dm = AlignDataModule(str(BAD / "too_few_rows.jsonl"), tokenizer=str(tiny_model_dir), batch_size=8, val_fraction=0.0)
    dm.setup()
    with pytest.raises(ValueError, match=r"too_few_rows.jsonl: the train split has 3 rows, fewer than data.batch_size=8; lower"):
        dm.train_dataloader()


def test_prompt_longer_than_max_length_keeps_its_end_and_the_whole_response(tiny_model_dir):
    dm = AlignDataModule(str(BAD / "long_prompt.jsonl"), tokenizer=str(tiny_model_dir), batch_size=2, val_fraction=0.0,
                         max_prompt_length=24, max_completion_length=64)
    dm.setup()
    long = next(e for e in dm.train_set if "FINAL QUESTION" in e["prompt"][0]["content"])
    assert len(long["prompt_ids"]) == 24
    assert dm.tokenizer.decode(long["prompt_ids"]).endswith("<|im_start|>assistant\n")  # prompt_truncation="end"
    assert dm.tokenizer.decode(long["chosen_ids"]) == "Yes, in moderation.<|im_end|>"


def test_tokenizer_without_chat_template(tiny_model_dir, tmp_path):
    plain = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    dm = AlignDataModule(str(BAD / "too_few_rows.jsonl"), tokenizer=str(plain), batch_size=1, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"has no chat template: set one \(tokenizer.chat_template\) or use a chat model"):
        dm.setup()


def test_unknown_category_names_file_row_and_field():
    from lit_align.srmir.categories import PromptSource, UnmappedCategoryError, read_prompt_source

    path = BAD / "unknown_category.csv"
    with pytest.raises(UnmappedCategoryError) as err:
        read_prompt_source(PromptSource(str(path)))
    assert f"{path} row 1 field 'category'" in str(err.value) and "'office_gossip'" in str(err.value)
    assert "unmapped='other'" in str(err.value)  # what to do
    rows, skipped = read_prompt_source(PromptSource(str(path)), unmapped="skip")
    assert len(rows) == 1 and skipped["unmapped"] == 1


def test_probe_of_the_wrong_hidden_size(tiny_model_dir, tmp_path):
    from lit_align.models import PolicyConfig
    from lit_align.modules.dpo import DPOModule
    from lit_align.probes.probe import build_probe

    probe = build_probe("hybrid", 16, [1, 2]).save(tmp_path / "probe_h16.safetensors")
    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), probe_path=str(probe))
    with pytest.raises(ValueError, match=rf"probe {probe} was trained on hidden size 16, but the backbone has hidden size 32: train a probe"):
        module.configure_model()


@pytest.mark.parametrize(
    "name,message",
    [
        ("shadow_manifest_not_json.json", "not valid JSON"),
        ("shadow_manifest_wrong_format.json", "field 'format' must be 'lit_align.srmir.shadow'; this is not a shadow manifest"),
        ("shadow_manifest_missing_path.json", "categories.insult.path must be the model directory"),
        ("shadow_manifest_missing_model.json", "categories.insult.path -> "),
    ],
)
def test_malformed_shadow_manifest(name, message):
    shadow = pytest.importorskip("lit_align.srmir.shadow", reason="lit_align/srmir/shadow.py has not landed")
    with pytest.raises(ValueError) as err:
        shadow.load_manifest(BAD / name)
    assert str(BAD / name) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("name,key", [("unknown_key.yaml", "betta"), ("unknown_trainer_key.yaml", "max_stepz")])
def test_config_with_an_unknown_key_names_it(name, key, capsys):
    from lit_align.cli import main

    with pytest.raises(SystemExit) as err:
        main(["fit", "-c", str(ROOT / "configs/dpo_tiny.yaml"), "-c", str(BAD / name)])
    assert err.value.code != 0
    assert key in capsys.readouterr().err


DPO, GRPO = "configs/dpo_tiny.yaml", "configs/grpo_function.yaml"
# config laid over, bad config, the one line `lit-align` must print (after "lit-align: error: ")
CLI_ERRORS = [
    (DPO, "cli_unknown_loss_type.yaml", "model.loss_type: 'sigmod' is not one of: sigmoid, ipo, hinge, robust, conservative"),
    (DPO, "cli_missing_model_dir.yaml",
     "name_or_path='/nonexistent/lit_align/tiny_model': no such directory, and not a hub id (those look like "
     "'org/name'): check the path"),
    (DPO, "cli_missing_hub_shaped_dir.yaml",
     "name_or_path='runs/no_such_model_dir': no such local directory, and as a hub id it could not be loaded ("),
    (DPO, "cli_negative_beta.yaml",
     "model.beta=-0.1 is out of range: it must be 0 < beta (a negative β inverts the preference; 0 ignores it)"),
    (DPO, "cli_label_smoothing_half.yaml",
     "model.label_smoothing=0.5 is out of range: it must be 0 ≤ label_smoothing < 0.5 (it is the assumed rate of "
     "flipped labels; at 0.5 or more the labels carry no preference)"),
    (DPO, "cli_zero_lr.yaml",
     "model.optimizer lr=0.0 is out of range: it must be 0 < optimizer lr (0 trains nothing; a negative rate "
     "ascends the loss)"),
    (DPO, "cli_negative_alpha.yaml",
     "ConfidenceReRanker.alpha=-7.5 is out of range: it must be 0 < alpha (α ≤ 0 inverts or flattens the probe's "
     "confidence)"),
    (GRPO, "cli_grpo_one_generation.yaml",
     "model.sampling.num_generations=1 is out of range: it must be 2 ≤ num_generations (GRPO compares at least 2 "
     "completions per prompt)"),
    (GRPO, "cli_grpo_top_p.yaml",
     "model.sampling.top_p=1.5 is out of range: it must be 0 < top_p ≤ 1 (a probability mass)"),
]


@pytest.mark.parametrize("base,name,line", CLI_ERRORS, ids=[c[1] for c in CLI_ERRORS])
def test_config_mistake_is_one_line_without_traceback(base, name, line, tiny_model_dir, shared_data, tmp_path, capsys):
    from lit_align.cli import main

    args = ["fit", "-c", str(ROOT / base), f"--model.init_args.policy.name_or_path={tiny_model_dir}",
            "-c", str(BAD / name), f"--data.path={shared_data / 'hh_rlhf_harmless_base_test.jsonl.gz'}",
            "--data.limit=16", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--trainer.logger=false"]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert len(errors) == 1 and errors[0].startswith("lit-align: error: " + line), errors


SUBCOMMAND_ERRORS = [
    (["--format", "foo"], "format: 'foo' is not one of: generic, hh_rlhf, pku_saferlhf"),  # the parser
    (["--policy.name_or_path", "/nonexistent/lit_align/model"],  # a ConfigError inside the command
     "name_or_path='/nonexistent/lit_align/model': no such directory, and not a hub id"),
]


@pytest.mark.parametrize("extra,line", SUBCOMMAND_ERRORS, ids=["parser", "config_error"])
def test_subcommand_config_mistake_is_one_line(extra, line, tiny_model_dir, tmp_path, capsys):
    from lit_align.cli import main
    from lit_align.probes.probe import build_probe

    data = tmp_path / "candidates.jsonl"
    data.write_text('{"prompt": "Hi?", "candidates": ["Hello.", "Go away."]}\n')
    probe = build_probe("hybrid", 32, [1, 2]).save(tmp_path / "probe.safetensors")
    args = ["rerank-candidates", "--data", str(data), "--probe", str(probe), "--policy.name_or_path",
            str(tiny_model_dir), "--output", str(tmp_path / "pairs.jsonl"), *extra]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert len(errors) == 1 and errors[0].startswith("lit-align: error: " + line), errors


def test_the_corpus_has_at_least_20_kinds():
    kinds = {c[0] for c in ROW_ERRORS + FILE_ERRORS} | {
        "too_few_rows", "long_prompt", "no_chat_template", "unknown_category", "probe_hidden_size",
        "unknown_key", "unknown_trainer_key",
    } | {f"manifest:{p.name}" for p in BAD.glob("shadow_manifest_*")}
    assert len(kinds) >= 20
