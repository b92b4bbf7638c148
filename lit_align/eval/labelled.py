"""Labelled completions: model responses with human refusal labels (XSTest's released completions).

A file has one row per (prompt, completion) with a human `final_label` of
`1_full_compliance`, `2_full_refusal` or `3_partial_refusal` (and, optionally, the two
annotators' labels `annotation_1`, `annotation_2`). It is read with `datasets` (csv, json,
jsonl, parquet; .gz allowed). The binary target of every judge is refusal: full refusals are
refusals, full compliances are not, and partial refusals go where `partial_refusal` says
(XSTest counts them as refusals; that is the default).

Every row becomes `{id, prompt, completion, label, refusal, type}` (+ `annotations` when given).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

log = logging.getLogger(__name__)

COMPLIANCE, REFUSAL, PARTIAL = "1_full_compliance", "2_full_refusal", "3_partial_refusal"
LABELS = (COMPLIANCE, REFUSAL, PARTIAL)
ANNOTATION_COLUMNS = ("annotation_1", "annotation_2")


@dataclass
class LabelledFile:
    """One file of labelled completions."""

    path: str
    """A local csv/json/jsonl/parquet file (.gz allowed) with prompt, completion and label columns."""
    name: Optional[str] = None
    """Label in the report (e.g. the model that wrote the completions); default: the file name."""
    prompt_column: str = "prompt"
    """Column with the prompt."""
    completion_column: str = "completion"
    """Column with the model's response."""
    label_column: str = "final_label"
    """Column with the human label: 1_full_compliance, 2_full_refusal or 3_partial_refusal."""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name.split(".")[0]


def is_refusal(label: str, partial_refusal: Literal["refusal", "compliance"] = "refusal") -> bool:
    """The binary target of a human label (partial refusals follow `partial_refusal`)."""
    if label == PARTIAL:
        return partial_refusal == "refusal"
    return label == REFUSAL


class BadRow(ValueError):
    """A row that cannot be used; `field` names the culprit (counted when rows are skipped)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _check_label(value, where: str, field: str) -> str:
    text = value.strip() if isinstance(value, str) else value
    if text not in LABELS:
        raise BadRow(f"{where}: field {field!r} holds {value!r}, not one of {list(LABELS)}", field)
    return text


def load_labelled(
    spec: LabelledFile,
    partial_refusal: Literal["refusal", "compliance"] = "refusal",
    on_bad_rows: Literal["error", "skip"] = "error",
) -> list[dict]:
    """The rows of a labelled file. A bad row (empty prompt or completion, unknown label) stops
    with an error naming file, row and field, or with `on_bad_rows: skip` is skipped, counted
    and logged. A missing column is always an error."""
    return load_labelled_counted(spec, partial_refusal, on_bad_rows)[0]


def load_labelled_counted(spec: LabelledFile, partial_refusal: str = "refusal", on_bad_rows: str = "error") -> tuple[list[dict], dict]:
    """`load_labelled` plus the skipped rows counted by field: `(rows, {field: count})`."""
    from datasets import load_dataset

    from lit_align.eval.prompts import _KINDS

    if partial_refusal not in ("refusal", "compliance"):
        raise ValueError(f"partial_refusal={partial_refusal!r}: choose 'refusal' or 'compliance'")
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows={on_bad_rows!r}: choose 'error' or 'skip'")
    path = Path(spec.path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled completions file {spec.path} does not exist")
    kind = next((k for ext, k in _KINDS.items() if path.name.lower().removesuffix(".gz").endswith(ext)), None)
    if kind is None:
        raise ValueError(f"{spec.path}: unsupported file type; use one of {sorted(_KINDS)} (optionally .gz)")
    table = load_dataset(kind, data_files=str(path), split="train")
    columns = list(table.column_names)
    for field in (spec.prompt_column, spec.completion_column, spec.label_column):
        if field not in columns:
            raise ValueError(f"{spec.path}: no column {field!r} (columns: {columns}); name the right one in the file spec")
    annotated = all(c in columns for c in ANNOTATION_COLUMNS)

    rows, skipped = [], Counter()
    for i, row in enumerate(table):
        where = f"{spec.path} row {i}"
        try:
            rows.append(_parse_row(spec, row, i, where, annotated, partial_refusal))
        except BadRow as err:
            if on_bad_rows == "error":
                raise BadRow(f"{err}; fix the row or set on_bad_rows: skip", err.field) from None
            skipped[err.field] += 1
            log.warning("skipping %s", err)
    if skipped:
        log.warning("%s: skipped %d bad rows %s", spec.path, sum(skipped.values()), dict(skipped))
    if not rows:
        raise ValueError(f"{spec.path}: no usable rows")
    return rows, dict(skipped)


def _parse_row(spec: LabelledFile, row: dict, i: int, where: str, annotated: bool, partial_refusal: str) -> dict:
    out = {"id": f"{Path(spec.path).name}:{i}", "type": row.get("type")}
    for key, field in (("prompt", spec.prompt_column), ("completion", spec.completion_column)):
        value = row[field]
        if not isinstance(value, str) or not value.strip():
            raise BadRow(f"{where}: field {field!r} is empty or not text ({value!r})", field)
        out[key] = value.strip()
    out["label"] = _check_label(row[spec.label_column], where, spec.label_column)
    out["refusal"] = is_refusal(out["label"], partial_refusal)
    if annotated:
        out["annotations"] = [_check_label(row[c], where, c) for c in ANNOTATION_COLUMNS]
    return out
