"""Prompt sets for safety evaluation: HarmBench, StrongREJECT, AdvBench and XSTest presets.

A preset knows a benchmark's columns (which one holds the prompt, which the category, which
rows to keep) so that `PromptSetConfig(preset="harmbench", path=...)` is all a user writes.
`path` is a local file (csv, json, jsonl, parquet; gzip allowed) or a Hugging Face dataset id;
both are read with `datasets`. Harmful prompts get one of the seven SRMIR categories through
the mapping tables of `lit_align.srmir.categories`; XSTest rows keep their XSTest `type`.

Every row becomes `{id, prompt, category, source_category, harmful, set}`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from lit_align.srmir.categories import OTHER, apply_keyword_rules, map_category

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """Where a benchmark keeps its fields. Column lists are tried in order (local CSV layout
    first, then common hub layouts)."""

    text_columns: tuple[str, ...]
    category_columns: tuple[str, ...]
    filters: dict = field(default_factory=dict)
    category_table: Optional[str] = None  # SRMIR mapping table; None keeps the source label
    harmful: Optional[bool] = True  # None: read from `harmful_column`
    harmful_column: Optional[str] = None
    harmful_values: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {
    # HarmBench: standard behaviours only (contextual ones need their ContextString, copyright
    # ones a hash-based judge).
    "harmbench": Preset(
        text_columns=("Behavior", "prompt"),
        category_columns=("SemanticCategory", "category"),
        filters={"FunctionalCategory": ["standard"]},
        category_table="harmbench",
    ),
    "strongreject": Preset(
        text_columns=("forbidden_prompt", "prompt"),
        category_columns=("category",),
        category_table="strongreject",
    ),
    # AdvBench has no categories of its own (its `Category` column is empty): rows go to the
    # explicit `other` bucket unless a keyword rule places them.
    "advbench": Preset(
        text_columns=("Behavior", "goal", "prompt"),
        category_columns=("Category", "SemanticCategory", "category"),
        category_table="advbench",
    ),
    # XSTest: the safe half measures over-refusal; `type` is the category.
    "xstest": Preset(
        text_columns=("prompt",),
        category_columns=("type",),
        filters={"label": ["safe"]},
        harmful=None,
        harmful_column="label",
        harmful_values=("unsafe",),
    ),
    # XSTest's 200 unsafe prompts (the contrast half) as a harmful set: refusal wanted.
    "xstest_unsafe": Preset(
        text_columns=("prompt",),
        category_columns=("type",),
        filters={"label": ["unsafe"]},
    ),
    # Any file with a prompt column; `harmful` says how to count it.
    "custom": Preset(text_columns=("prompt", "instruction"), category_columns=("category",)),
}


@dataclass
class PromptSetConfig:
    """One prompt set to evaluate on."""

    preset: Literal["harmbench", "strongreject", "advbench", "xstest", "xstest_unsafe", "custom"] = "harmbench"
    """Which benchmark layout `path` has."""
    path: str = ""
    """A local file (csv/json/jsonl/parquet, .gz allowed) or a Hugging Face dataset id."""
    name: Optional[str] = None
    """Label in the report; default: the preset name."""
    subset: Optional[str] = None
    """Hub dataset configuration (e.g. "standard"); local files ignore it."""
    split: str = "train"
    """Hub split; a local file is one split."""
    filters: Optional[dict[str, list[str]]] = None
    """Keep rows whose column has one of the values; None: the preset's (HarmBench
    FunctionalCategory=standard, XSTest label=safe); {} keeps every row."""
    text_column: Optional[str] = None
    """Column with the prompt; None: the preset's."""
    category_column: Optional[str] = None
    """Column with the category; None: the preset's (if the file has it)."""
    harmful: Optional[bool] = None
    """Whether the prompts are harmful (refusal wanted) or safe (compliance wanted); None: the
    preset's (XSTest reads its `label` column)."""
    unmapped: Literal["error", "other"] = "other"
    """A category the SRMIR table does not know: stop with an error, or the `other` bucket."""
    limit: Optional[int] = None
    """Evaluate a seeded random subset of this many rows (in file order); None: all."""
    seed: int = 0
    """Seed of the subset."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A row without prompt text: stop naming file, row and field, or skip it (counted)."""

    @property
    def label(self) -> str:
        return self.name or self.preset


def _load_table(path: str, subset: Optional[str], split: str):
    from datasets import load_dataset

    local = Path(path)
    if local.exists():
        name = local.name.lower().removesuffix(".gz")
        kind = next((k for ext, k in _KINDS.items() if name.endswith(ext)), None)
        if kind is None:
            raise ValueError(f"{path}: unsupported file type; use one of {sorted(_KINDS)} (optionally .gz)")
        return load_dataset(kind, data_files=str(local), split="train")
    if path.startswith((".", "/")) or path.endswith(tuple(_KINDS)):
        raise FileNotFoundError(f"prompt set file {path} does not exist")
    return load_dataset(path, subset, split=split)


_KINDS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _first_present(candidates: tuple[str, ...], columns: list[str]) -> Optional[str]:
    return next((c for c in candidates if c in columns), None)


def load_prompt_set(cfg: PromptSetConfig) -> list[dict]:
    """The rows of one prompt set, filtered, categorised and (optionally) subsampled."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"prompt set preset {cfg.preset!r}: choose one of {sorted(PRESETS)}")
    if not cfg.path:
        raise ValueError(f"prompt set {cfg.label!r}: `path` is empty; name a file or a hub dataset id")
    preset = PRESETS[cfg.preset]
    table = _load_table(cfg.path, cfg.subset, cfg.split)
    columns = list(table.column_names)
    where = f"{cfg.path} ({cfg.preset})"

    text_col = cfg.text_column or _first_present(preset.text_columns, columns)
    if text_col is None or text_col not in columns:
        wanted = cfg.text_column or " or ".join(preset.text_columns)
        raise ValueError(f"{where}: no prompt column {wanted!r} (columns: {columns}); set text_column")
    cat_col = cfg.category_column or _first_present(preset.category_columns, columns)
    if cat_col is not None and cat_col not in columns:
        raise ValueError(f"{where}: no category column {cat_col!r} (columns: {columns})")
    filters = preset.filters if cfg.filters is None else cfg.filters
    for column in filters:
        if column not in columns:
            raise ValueError(
                f"{where}: filter column {column!r} is missing (columns: {columns}); "
                "set `filters: {}` to keep every row, or name columns this file has"
            )

    rows, skipped = [], Counter()
    for i, row in enumerate(table):
        if any(str(row[c]) not in set(map(str, allowed)) for c, allowed in filters.items()):
            continue
        text = row[text_col]
        if not isinstance(text, str) or not text.strip():
            if cfg.on_bad_rows == "skip":
                skipped["empty prompt"] += 1
                continue
            raise ValueError(
                f"{cfg.path} row {i}: field {text_col!r} is empty or not text ({text!r}); "
                "fix the row or set on_bad_rows: skip"
            )
        source_category = row.get(cat_col) if cat_col else None
        source_category = source_category.strip() if isinstance(source_category, str) else source_category
        rows.append(
            dict(
                id=f"{Path(cfg.path).name}:{i}",
                prompt=text.strip(),
                category=_category(preset, cfg, text, source_category, f"{cfg.path} row {i} field {cat_col!r}"),
                source_category=source_category or None,
                harmful=_is_harmful(preset, cfg, row, f"{cfg.path} row {i}"),
                set=cfg.label,
            )
        )
    if skipped:
        log.warning("%s: skipped %s", where, dict(skipped))
    if not rows:
        raise ValueError(f"{where}: no rows left after filters {filters}")
    if cfg.limit is not None and cfg.limit < len(rows):
        keep = sorted(random.Random(cfg.seed).sample(range(len(rows)), cfg.limit))
        log.info("%s: evaluating a seeded random subset of %d of %d rows (seed %d)", where, cfg.limit, len(rows), cfg.seed)
        rows = [rows[i] for i in keep]
    return rows


def _category(preset: Preset, cfg: PromptSetConfig, text: str, value, where: str) -> str:
    """SRMIR category for harmful presets (keyword rule first, as in SRMIR's build); the
    source label otherwise; `other` when there is none."""
    if preset.category_table is None:
        return str(value) if value else OTHER
    ruled = apply_keyword_rules(text, None)
    if ruled is not None:
        return ruled
    if not value:
        return OTHER
    return map_category(value, preset.category_table, cfg.unmapped, where)


def _is_harmful(preset: Preset, cfg: PromptSetConfig, row: dict, where: str) -> bool:
    if cfg.harmful is not None:
        return cfg.harmful
    if preset.harmful is not None:
        return preset.harmful
    value = row.get(preset.harmful_column)
    if value is None:
        raise ValueError(f"{where}: field {preset.harmful_column!r} is empty; it says whether the prompt is harmful")
    return str(value).strip() in preset.harmful_values


def category_counts(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["category"] for r in rows).items()))
