"""What an ablation builds once before its arms (paper B: the CoD data, the reward models).

`prepare` in an ablation configuration is a list of steps, each a `lit-align` command:

    prepare:
      - name: cod
        command: build-cod
        args: [-c, configs/paper_b/cod.yaml]
        outputs: [runs/paper_b/cod/cod.jsonl]

run in order, in this process, before any arm. `<out_dir>/prepare/<name>.json` records a finished
step (its argv, seconds, load average); a re-run skips a step whose record has the same argv and
whose outputs exist, runs again one that stopped part-way (the commands resume their own work:
build-cod appends) or whose record was deleted, and then every step after it (they read its
outputs); it stops when a recorded step's argv changed (delete its record to rebuild). Arms
trained on other outputs are not reused: `prepared_fingerprint` hashes the outputs' contents.

`filter_prompts` (`lit-align filter-prompts`) is the first step of paper B: harmful training
prompts for build-cod with every evaluation prompt, and every near copy of one, left out.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lit_align.eval.prompts import PromptSetConfig
from lit_align.experiments.costs import load_average
from lit_align.srmir.categories import CATEGORIES, PromptSource, Unmapped

log = logging.getLogger(__name__)


@dataclass
class PrepareStep:
    """One command the ablation runs once before its arms."""

    name: str
    """Its record (`<out_dir>/prepare/<name>.json`) and row in the table (letters, digits, `-`, `_`)."""
    command: str
    """A `lit-align` command: build-cod, train-shadow, filter-prompts, fit, ..."""
    args: list[str] = field(default_factory=list)
    """Its arguments, e.g. `[-c, configs/paper_b/cod.yaml]`; `${name}` is replaced as in arm overrides."""
    outputs: list[str] = field(default_factory=list)
    """Files or directories the step makes (`${name}` replaced): it is done when they exist and its record does."""
    report: Optional[str] = None
    """A Markdown file the step writes, copied into ablation.md (e.g. the held-out accuracy table)."""


def check_steps(steps: list[PrepareStep]) -> None:
    from lit_align.cli import COMMANDS, TRAINER_SUBCOMMANDS

    from lit_align.experiments.ablate import check_names

    check_names([s.name for s in steps], "prepare step", "prepare step names")
    for step in steps:
        if step.command not in COMMANDS and step.command not in TRAINER_SUBCOMMANDS:
            raise ValueError(f"ablate: prepare step {step.name!r}: unknown command {step.command!r} "
                             f"(choose one of {[*TRAINER_SUBCOMMANDS, *COMMANDS]})")
        if not step.outputs:
            raise ValueError(f"ablate: prepare step {step.name!r} names no outputs: list the files it writes, "
                             "so that a re-run knows it is done")


def run_steps(steps: list[PrepareStep], values: dict[str, str], out: Path) -> list[dict]:
    """Run (or skip, when done) every step in order; their records."""
    from lit_align.cli import main
    from lit_align.experiments.ablate import substitute

    records, rerun = [], False
    for step in steps:
        where = f"prepare.{step.name}"
        argv = [step.command, *substitute(step.args, values, f"{where}.args")]
        outputs = substitute(step.outputs, values, f"{where}.outputs")
        report = substitute(step.report, values, f"{where}.report") if step.report else None
        path = out / "prepare" / f"{step.name}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("argv") != argv:
                raise ValueError(f"ablate: prepare step {step.name!r} ran with other arguments ({record.get('argv')}); "
                                 f"delete {path} and its outputs {outputs} to rebuild them, or restore the arguments")
            if not rerun and all(Path(o).exists() for o in outputs):
                print(f"[ablate] prepare {step.name}: done already ({path}), skipping")
                records.append(record)
                continue
        print(f"[ablate] prepare {step.name}: lit-align {' '.join(argv)}")
        rerun = True  # the steps after this one read its outputs
        load_start, start = load_average(), time.perf_counter()
        main(argv)
        missing = [o for o in outputs if not Path(o).exists()]
        if missing:
            raise RuntimeError(f"ablate: prepare step {step.name!r} (lit-align {' '.join(argv)}) did not write {missing}")
        record = {
            "name": step.name, "argv": argv, "outputs": outputs, "report": report,
            "seconds": round(time.perf_counter() - start, 2), "load_average": {"start": load_start, "end": load_average()},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        records.append(record)
    return records


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes; of a directory, of its files' names and digests."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else "").encode())
        with f.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def prepared_fingerprint(records: list[dict]) -> Optional[str]:
    """A hash of every step's argv and outputs' contents (a manifest names its models and when they
    were made): arms trained on other data or reward models are not reused silently."""
    from lit_align.experiments.ablate import fingerprint

    return fingerprint([(r["argv"], [content_digest(Path(o)) for o in r["outputs"]]) for r in records]) if records else None


# ---------------------------------------------------------------------------- lit-align filter-prompts
def rule_category(prompt: str, rules: dict[str, re.Pattern]) -> Optional[str]:
    return next((c for c, pattern in rules.items() if pattern.search(prompt)), None)


def compile_rules(category_rules: dict[str, str]) -> dict[str, re.Pattern]:
    """Each SRMIR category's pattern compiled (case-insensitive); an unknown category or a bad pattern is an error."""
    rules = {}
    for category, pattern in category_rules.items():
        if category not in CATEGORIES:
            raise ValueError(f"filter-prompts: category_rules.{category}: not an SRMIR category ({list(CATEGORIES)})")
        try:
            rules[category] = re.compile(pattern, re.IGNORECASE)
        except re.error as err:
            raise ValueError(f"filter-prompts: category_rules.{category}: {pattern!r} is not a regular expression ({err})") from None
    return rules


def leave_out_evaluation_prompts(
    sources: list[PromptSource], references: list[str], max_overlap: float, unmapped: Unmapped, keyword_rules: bool
) -> tuple[list[dict], list[dict], dict[str, Counter]]:
    """`(rows, excluded, counts)`: the sources' rows without the ones close to a reference and without
    repeats; the excluded rows with the reference each is close to; per source read / excluded / repeated."""
    from lit_align.data.refusal_pairs import near_duplicates
    from lit_align.srmir.categories import read_prompt_source

    rows, seen, counts, excluded = [], set(), defaultdict(Counter), []
    for source in sources:
        read, _ = read_prompt_source(source, unmapped, "classify", keyword_rules)
        name = Path(source.path).name
        counts[name]["read"] += len(read)
        for row, hit in zip(read, near_duplicates([r["prompt"] for r in read], references, max_overlap)):
            key = " ".join(row["prompt"].lower().split())
            if hit is not None:
                counts[name]["excluded"] += 1
                excluded.append({"prompt": row["prompt"], "source": name, "close_to": hit})
            elif key in seen:
                counts[name]["repeated"] += 1
            else:
                seen.add(key)
                rows.append(row)
    return rows, excluded, counts


def label_by_rules(rows: list[dict], rules: dict[str, re.Pattern]) -> None:
    """Mark where each row's category came from; an unlabelled row takes the first rule it matches."""
    for row in rows:
        row["category_from"] = "label" if row["category"] is not None else None
        if row["category"] is None and (category := rule_category(row["prompt"], rules)) is not None:
            row["category"], row["category_from"] = category, "rule"


def filter_prompts(
    sources: list[PromptSource],
    exclude: list[PromptSetConfig],
    output: str,
    max_overlap: float = 0.8,
    category_rules: Optional[dict[str, str]] = None,
    unmapped: Unmapped = "error",
    keyword_rules: bool = True,
) -> dict:
    """Harmful training prompts with the evaluation prompts kept out, for `lit-align build-cod`.

    Reads `sources` as build-cod does (labels mapped onto the SRMIR categories; an unlabelled row
    keeps `category: null`, for build-cod's `uncategorized: classify`), drops prompts repeated
    across sources and every prompt that is, or is close to, a prompt of `exclude`
    (`lit_align.data.refusal_pairs.near_duplicates`), gives an unlabelled row the category of the
    first `category_rules` pattern it matches, and writes JSONL rows `{prompt, category, source,
    source_category, category_from}` (build-cod's `prompt` + `category` layout).

    Args:
        sources: Harmful-prompt files, as build-cod's `sources`.
        exclude: Prompt sets no training prompt may be (close to): the evaluation sets.
        output: The JSONL to write; also `<output>.counts.{json,md}` and `<output>.excluded.jsonl`
            (each dropped prompt with the evaluation prompt it is close to).
        max_overlap: Share of content words in common from which two prompts are near copies.
        category_rules: SRMIR category -> regular expression (case-insensitive) for rows without a
            label, tried in order: categories the labelled sources lack (e.g. no source without
            evaluation prompts labels unfairness_discrimination).
        unmapped: A source label missing from its mapping table: error, other or skip.
        keyword_rules: build-cod's mental-health keyword rule.
    """
    from lit_align.eval.prompts import load_prompt_set

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rules = compile_rules(category_rules or {})
    references = [r["prompt"] for cfg in exclude for r in load_prompt_set(cfg)]
    if not references:
        raise ValueError("filter-prompts: `exclude` holds no prompts; name the evaluation sets to keep out")
    rows, excluded, counts = leave_out_evaluation_prompts(sources, references, max_overlap, unmapped, keyword_rules)
    label_by_rules(rows, rules)
    write_output(Path(output), rows, excluded, counts)
    return {"sources": {k: dict(v) for k, v in counts.items()}, "categories": category_table(rows), "excluded": len(excluded)}


def category_table(rows: list[dict]) -> dict[str, dict]:
    table: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        table[r["category"] or "(unlabelled: build-cod classifies)"][r["category_from"] or "none"] += 1
    return {c: dict(v) for c, v in sorted(table.items())}


def write_output(output: Path, rows: list[dict], excluded: list[dict], counts: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    keep = ("prompt", "category", "source", "source_category", "category_from")
    output.write_text("".join(json.dumps({k: r.get(k) for k in keep}, ensure_ascii=False) + "\n" for r in rows))
    base = output.with_name(output.name.removesuffix(".jsonl"))
    Path(f"{base}.excluded.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in excluded))
    categories = category_table(rows)
    summary = {"sources": {k: dict(v) for k, v in counts.items()}, "categories": categories, "written": len(rows)}
    Path(f"{base}.counts.json").write_text(json.dumps(summary, indent=1))
    lines = ["| source | read | excluded (near an evaluation prompt) | repeated | kept |", "|---|---|---|---|---|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {c['read']} | {c['excluded']} | {c['repeated']} | {c['read'] - c['excluded'] - c['repeated']} |")
    lines += ["", "| category | from a label | from a rule | unlabelled |", "|---|---|---|---|"]
    lines += [f"| {c} | {v.get('label', 0)} | {v.get('rule', 0)} | {v.get('none', 0)} |" for c, v in categories.items()]
    Path(f"{base}.counts.md").write_text("\n".join(lines) + "\n")
    log.info("filter-prompts: %d prompts written to %s, %d left out as near copies of evaluation prompts (%s)",
             len(rows), output, len(excluded), f"{base}.excluded.jsonl")


__all__ = ["PrepareStep", "filter_prompts", "prepared_fingerprint", "run_steps"]
