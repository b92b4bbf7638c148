"""The prompt sets an evaluation part runs on: the prefill attack on harmful prompts, drift on safe ones."""

from __future__ import annotations

from typing import Optional


def select_sets(part: str, sets: Optional[list[str]], rows_by_set: dict[str, list[dict]], harmful: bool, example: str) -> list[str]:
    """The sets `<part>.sets` names (null: every set with harmful prompts, or with safe ones when
    `harmful` is False), each checked to exist and to have such prompts; `example` is the preset
    the error suggests when no set has any."""
    kind = "harmful" if harmful else "safe"
    having = [s for s, rows in rows_by_set.items() if any(bool(r["harmful"]) == harmful for r in rows)]
    if sets is None:
        if not having:
            raise ValueError(
                f"{part}: no prompt set has {kind} prompts ({sorted(rows_by_set)}); add one "
                f"(e.g. {{preset: {example}, path: ...}}) or drop `{part}`"
            )
        return having
    for s in sets:
        if s not in rows_by_set:
            raise ValueError(f"{part}.sets: no prompt set named {s!r}; the sets are {sorted(rows_by_set)}")
        if s not in having:
            raise ValueError(f"{part}.sets: {s!r} has no {kind} prompts; the sets with {kind} prompts are {having}")
    return list(dict.fromkeys(sets))
