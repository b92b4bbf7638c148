"""The seven SRMIR harm categories and how other datasets' labels map onto them (SPEC B1).

Each source taxonomy has a table `source label -> SRMIR category`. A label missing from its
table is never dropped silently: `unmapped="error"` stops with the file, row and value;
`"other"` puts the prompt in the explicit `other` bucket; `"skip"` drops it with a logged count.

None of the public benchmarks has a mental-health class, so one keyword rule (suicide,
self-harm, eating disorders, psychological manipulation) moves matching prompts into
`mental_health` whatever their source label; `keyword_rules=False` turns it off.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional

log = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = (
    "insult",
    "unfairness_discrimination",
    "crimes_illegal_activities",
    "physical_harm",
    "mental_health",
    "privacy_property",
    "ethics_morality",
)
OTHER = "other"

# HarmBench `SemanticCategory` (also refusal_direction's `category`, and AdvBench's `Category`
# column, which uses HarmBench's layout).
HARMBENCH: dict[str, str] = {
    "chemical_biological": "physical_harm",
    "copyright": "privacy_property",  # intellectual property
    "cybercrime_intrusion": "crimes_illegal_activities",
    "harassment_bullying": "insult",
    "harmful": "physical_harm",  # mostly dangerous advice: bleach mixtures, drugs, tampering
    "illegal": "crimes_illegal_activities",
    "misinformation_disinformation": "ethics_morality",  # deception
}

# StrongREJECT `category`.
STRONGREJECT: dict[str, str] = {
    "Disinformation and deception": "ethics_morality",
    "Hate, harassment and discrimination": "unfairness_discrimination",
    "Illegal goods and services": "crimes_illegal_activities",
    "Non-violent crimes": "crimes_illegal_activities",
    "Sexual content": "ethics_morality",
    "Violence": "physical_harm",
}

# PKU-SafeRLHF harm types (the 19 keys of `response_{0,1}_harm_category`).
PKU_SAFERLHF: dict[str, str] = {
    "Animal Abuse": "ethics_morality",
    "Copyright Issues": "privacy_property",
    "Cybercrime": "crimes_illegal_activities",
    "Discriminatory Behavior": "unfairness_discrimination",
    "Disrupting Public Order": "crimes_illegal_activities",
    "Drugs": "crimes_illegal_activities",
    "Economic Crime": "crimes_illegal_activities",
    "Endangering National Security": "crimes_illegal_activities",
    "Endangering Public Health": "physical_harm",
    "Environmental Damage": "ethics_morality",
    "Human Trafficking": "crimes_illegal_activities",
    "Insulting Behavior": "insult",
    "Mental Manipulation": "mental_health",
    "Physical Harm": "physical_harm",
    "Privacy Violation": "privacy_property",
    "Psychological Harm": "mental_health",
    "Sexual Content": "ethics_morality",
    "Violence": "physical_harm",
    "White-Collar Crime": "crimes_illegal_activities",
}

# When one PKU-SafeRLHF row carries several harm types, the first category in this order wins:
# rarer categories first, so that multi-label rows help balance instead of swelling `crimes`.
MULTI_LABEL_PRIORITY: tuple[str, ...] = (
    "mental_health",
    "insult",
    "unfairness_discrimination",
    "privacy_property",
    "physical_harm",
    "ethics_morality",
    "crimes_illegal_activities",
)

TABLES: dict[str, dict[str, str]] = {
    "harmbench": HARMBENCH,
    "advbench": HARMBENCH,
    "refusal_direction": HARMBENCH,
    "strongreject": STRONGREJECT,
    "pku_saferlhf": PKU_SAFERLHF,
    "srmir": {c: c for c in CATEGORIES},  # files already labelled with the seven names
}

KEYWORD_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (
        re.compile(
            r"suicid|self[- ]harm|anorexi|bulimi|eating disorder|gaslight|psychologically manipulat",
            re.IGNORECASE,
        ),
        "mental_health",
    ),
)

Unmapped = Literal["error", "other", "skip"]


class UnmappedCategoryError(ValueError):
    """A source label that its mapping table does not know."""


def apply_keyword_rules(prompt: str, category: Optional[str]) -> Optional[str]:
    """The category a keyword rule assigns to `prompt`, else `category` unchanged."""
    for pattern, target in KEYWORD_RULES:
        if pattern.search(prompt):
            return target
    return category


def map_category(value: str, table: str, unmapped: Unmapped = "error", where: str = "") -> Optional[str]:
    """One source label -> an SRMIR category, `OTHER`, or None (skip).

    `where` names the file and row for the error message.
    """
    if table not in TABLES:
        raise ValueError(f"unknown category table {table!r}; choose one of {sorted(TABLES)}")
    mapped = TABLES[table].get(value.strip() if isinstance(value, str) else value)
    if mapped is not None:
        return mapped
    if unmapped == "other":
        return OTHER
    if unmapped == "skip":
        return None
    known = ", ".join(sorted(TABLES[table]))
    raise UnmappedCategoryError(
        f"{where}: category {value!r} is not in the {table!r} mapping table ({known}). "
        "Add it to lit_align.srmir.categories, or set unmapped='other' (explicit `other` bucket) "
        "or unmapped='skip' (dropped with a logged count)."
    )


def pick_multi_label(categories: set[str]) -> str:
    """One SRMIR category for a row with several (see MULTI_LABEL_PRIORITY)."""
    for c in MULTI_LABEL_PRIORITY:
        if c in categories:
            return c
    return sorted(categories)[0]  # only `other` left


# ---------------------------------------------------------------------------- reading sources
@dataclass
class PromptSource:
    """A file of harmful prompts with a category label (CSV, JSON or JSONL)."""

    path: str
    """The file. Layouts recognised from their columns: HarmBench / AdvBench (`Behavior`),
    StrongREJECT (`forbidden_prompt`), refusal_direction (`instruction`), PKU-SafeRLHF
    (`prompt` + `response_0_harm_category`), or any file with `prompt` and `category`."""
    table: Optional[str] = None
    """Mapping table (harmbench, advbench, strongreject, refusal_direction, pku_saferlhf, srmir);
    None: guessed from the columns."""
    prompt_field: Optional[str] = None
    """Column holding the prompt; None: guessed."""
    category_field: Optional[str] = None
    """Column holding the source label; None: guessed."""
    limit: Optional[int] = None
    """Read only the first `limit` rows (quick runs)."""
    max_prompt_chars: Optional[int] = None
    """Skip (counted) prompts longer than this, e.g. HarmBench's contextual behaviours."""


_LAYOUTS = (  # (required columns, table, prompt field, category field)
    ({"Behavior", "SemanticCategory"}, "harmbench", "Behavior", "SemanticCategory"),
    ({"Behavior", "Category"}, "advbench", "Behavior", "Category"),
    ({"forbidden_prompt", "category"}, "strongreject", "forbidden_prompt", "category"),
    ({"instruction", "category"}, "refusal_direction", "instruction", "category"),
    ({"prompt", "response_0_harm_category"}, "pku_saferlhf", "prompt", "response_0_harm_category"),
    ({"prompt", "category"}, "srmir", "prompt", "category"),
)


def _load_table(path: Path):
    from datasets import load_dataset

    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".jsonl.gz": "json", ".json.gz": "json"}.get(suffix)
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (csv, json, jsonl)")
    return load_dataset(kind, data_files=str(path), split="train")


def _row_labels(row: dict, source: PromptSource, category_field: str) -> list[str]:
    value = row.get(category_field)
    if category_field == "response_0_harm_category":  # PKU: dicts of {harm type: bool}
        labels = []
        for key in ("response_0_harm_category", "response_1_harm_category"):
            labels += [k for k, on in (row.get(key) or {}).items() if on]
        return sorted(set(labels))
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return [value]


class _Layout(NamedTuple):
    table: str
    prompt_field: str
    category_field: str


def _layout(path: Path, columns: set[str], source: PromptSource) -> _Layout:
    """The source's table and fields: its own settings, the rest recognised from the columns."""
    table, prompt_field, category_field = source.table, source.prompt_field, source.category_field
    for required, t, pf, cf in _LAYOUTS:
        if required <= columns:
            table, prompt_field, category_field = table or t, prompt_field or pf, category_field or cf
            break
    if not (table and prompt_field and category_field):
        raise ValueError(
            f"{path}: cannot tell the layout from its columns {sorted(columns)}; "
            "set table, prompt_field and category_field"
        )
    for field in (prompt_field, category_field):
        if field not in columns:
            raise ValueError(f"{path}: no column {field!r} (columns: {sorted(columns)})")
    return _Layout(table, prompt_field, category_field)


def _row_prompt(row: dict, prompt_field: str, where: str) -> str:
    """The row's prompt, after its HarmBench context if it has one; an error if it is empty."""
    prompt = row.get(prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field {prompt_field!r} is empty or not text ({prompt!r})")
    context = row.get("ContextString")
    if isinstance(context, str) and context.strip():  # HarmBench contextual behaviours
        prompt = f"{context.strip()}\n\n---\n\n{prompt.strip()}"
    return prompt


def _row_category(
    row: dict, labels: list[str], layout: _Layout, where: str, unmapped: Unmapped, uncategorized: str, keyword_rules: bool
) -> tuple[Optional[str], Optional[str]]:
    """`(category, None)`, or `(None, reason)` for a row to skip: a keyword rule's category first, then
    the row's labels mapped, then `uncategorized` for a row without labels."""
    ruled = apply_keyword_rules(row[layout.prompt_field], None) if keyword_rules else None
    if ruled is not None:
        return ruled, None
    if not labels:
        if uncategorized == "error":
            raise ValueError(
                f"{where}: field {layout.category_field!r} is empty. Set uncategorized='skip', 'other' "
                "or 'classify' (a prompt classifier trained on the labelled sources)."
            )
        if uncategorized == "skip":
            return None, "uncategorized"
        return (OTHER if uncategorized == "other" else None), None
    mapped = {map_category(v, layout.table, unmapped, f"{where} field {layout.category_field!r}") for v in labels}
    mapped.discard(None)
    return (pick_multi_label(mapped), None) if mapped else (None, "unmapped")


def read_prompt_source(
    source: PromptSource,
    unmapped: Unmapped = "error",
    uncategorized: Literal["error", "skip", "other", "classify"] = "error",
    keyword_rules: bool = True,
) -> tuple[list[dict], Counter]:
    """Rows `{id, prompt, category, source, source_category}` and a Counter of what was skipped.

    A row without a label follows `uncategorized`: "error" names the file and row, "skip" drops
    it (counted), "other" buckets it, "classify" leaves `category=None` for the caller's
    classifier. The keyword rules may still give an unlabelled row its category.
    """
    path = Path(source.path)
    if not path.exists():
        raise FileNotFoundError(f"prompt source {path} does not exist")
    ds = _load_table(path)
    layout = _layout(path, set(ds.column_names), source)
    rows, skipped = [], Counter()
    n = len(ds) if source.limit is None else min(source.limit, len(ds))
    for i in range(n):
        row, where = ds[i], f"{path} row {i}"
        prompt = _row_prompt(row, layout.prompt_field, where)
        if source.max_prompt_chars is not None and len(prompt) > source.max_prompt_chars:
            skipped["too_long"] += 1
            continue
        labels = _row_labels(row, source, layout.category_field)
        category, skip = _row_category(row, labels, layout, where, unmapped, uncategorized, keyword_rules)
        if skip is not None:
            skipped[skip] += 1
            continue
        rows.append(dict(id=f"{path.name}:{i}", prompt=prompt.strip(), category=category, source=path.name,
                         source_category="|".join(map(str, labels)) or None))
    if skipped:
        log.warning("%s: skipped %s", path, dict(skipped))
    return rows, skipped
