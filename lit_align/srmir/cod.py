"""`lit-align build-cod`: the balanced Chain-of-Draft (CoD) safety preference set (SPEC B1).

sources -> map onto the seven categories -> de-duplicate -> balance -> for each prompt a CoD
refusal from the generator LM (chosen) and a policy sample on the bare prompt (rejected) ->
JSONL, one record per line, appended and flushed as it goes so that a re-run resumes.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

from tqdm.auto import tqdm

from lit_align.generation import Generator, SamplingConfig
from lit_align.sampling import LeanGenerator
from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer
from lit_align.srmir.categories import CATEGORIES, OTHER, PromptSource, Unmapped, read_prompt_source

log = logging.getLogger(__name__)

# SPEC B1, verbatim.
COD_TEMPLATE = (
    "Think step by step, but only keep a minimum draft for each thinking step, with 5 words at most.\n"
    "Return the answer at the end of the response after a separator ####.\n"
    "Why did you refuse to answer '{prompt}'? Provide your reasoning process for refusal."
)
SEPARATOR = "####"

# An optional worked example shown before the SPEC prompt (`one_shot=True`): small generators
# (SmolLM2-135M) rarely write the `####` separator from the instruction alone.
DEMONSTRATION = (
    "How can I steal my neighbour's car?",
    "Request: steal a car.\nTheft is a crime.\nHarms the owner.\nMust not assist.\n"
    "#### I'm sorry, but I can't help with stealing a car.",
)


def cod_prompt(prompt: str) -> str:
    return COD_TEMPLATE.replace("{prompt}", prompt)  # not str.format: prompts may hold braces


def cod_messages(prompt: str, one_shot: bool = False) -> list[dict]:
    """The chat given to the generator: the SPEC prompt, after the demonstration if `one_shot`."""
    turns = []
    if one_shot:
        question, answer = DEMONSTRATION
        turns = [{"role": "user", "content": cod_prompt(question)}, {"role": "assistant", "content": answer}]
    return turns + [{"role": "user", "content": cod_prompt(prompt)}]


def is_valid_cod(text: str) -> bool:
    """Drafts, then `####`, then a non-empty answer."""
    head, sep, answer = text.partition(SEPARATOR)
    return bool(sep) and bool(answer.strip())


# ---------------------------------------------------------------------------- planning
def collect_prompts(
    sources: list[PromptSource], unmapped: Unmapped, uncategorized: str, keyword_rules: bool, seed: int
) -> list[dict]:
    """All sources' rows, de-duplicated by prompt text; unlabelled rows classified if asked."""
    rows, seen, duplicates = [], set(), 0
    for source in sources:
        for row in read_prompt_source(source, unmapped, uncategorized, keyword_rules)[0]:
            key = " ".join(row["prompt"].lower().split())
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows.append(row)
    if duplicates:
        log.info("dropped %d prompts repeated across or within sources", duplicates)
    unlabelled = [r for r in rows if r["category"] is None]
    if unlabelled:
        from lit_align.srmir.classifier import PromptCategoryClassifier

        labelled = [r for r in rows if r["category"] is not None]
        if not labelled:
            raise ValueError("uncategorized='classify' needs at least one source with categories")
        names = sorted({r["category"] for r in labelled})
        clf = PromptCategoryClassifier(names).fit([r["prompt"] for r in labelled], [r["category"] for r in labelled], seed=seed)
        for row, cat in zip(unlabelled, clf.predict([r["prompt"] for r in unlabelled])):
            row["category"], row["category_from"] = cat, "classifier"
        log.info("classified %d prompts without a category: %s", len(unlabelled), dict(Counter(r["category"] for r in unlabelled)))
    return rows


def balance(
    rows: list[dict], categories: list[str], mode: Literal["down", "up", "none"], per_category: Optional[int], seed: int
) -> tuple[list[dict], dict[str, dict]]:
    """Equal counts per category. Returns the plan (categories interleaved, so a partial run is
    still balanced) and per-category stats {available, selected, upsampled}."""
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    outside = {c: len(v) for c, v in by_cat.items() if c not in categories}
    if outside:
        log.warning("ignoring prompts of categories not requested: %s", outside)
    empty = [c for c in categories if not by_cat.get(c)]
    if empty:
        raise ValueError(f"no prompts for categories {empty}: add a source that covers them or drop them from `categories`")
    sizes = {c: len(by_cat[c]) for c in categories}
    if mode == "none":
        target = None
    elif per_category is not None:
        target = per_category
    else:
        target = min(sizes.values()) if mode == "down" else max(sizes.values())
    if mode == "down" and target is not None and target > min(sizes.values()):
        short = {c: n for c, n in sizes.items() if n < target}
        raise ValueError(f"balance='down' with per_category={target}, but {short} have fewer prompts; use balance='up'")
    stats, picked = {}, {}
    for c in categories:
        # one seeded shuffle per category: a larger per_category extends the plan of a smaller
        # one, so a re-run with more prompts per category keeps what is already written
        rng = random.Random(f"{seed}:{c}")
        pool = list(by_cat[c])
        rng.shuffle(pool)
        n = len(pool) if target is None else target
        chosen = pool[:n]
        extra = [dict(r, id=f"{r['id']}#{k + 1}") for k, r in enumerate(rng.choices(pool, k=max(0, n - len(pool))))]
        picked[c] = chosen + extra
        stats[c] = {"available": len(pool), "selected": len(chosen), "upsampled": len(extra)}
        if extra:
            log.info("category %s: up-sampled %d copies to reach %d", c, len(extra), n)
    plan = [picked[c][i] for i in range(max(map(len, picked.values()))) for c in categories if i < len(picked[c])]
    return plan, stats


# ---------------------------------------------------------------------------- output
def read_done(output: Path) -> dict[str, dict]:
    """Records already in `output` by id. A torn last line (killed mid-write) is cut off."""
    done: dict[str, dict] = {}
    if not output.exists():
        return done
    lines = output.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: cutting a torn last line (an interrupted write)", output)
                output.write_text("".join(lines[:-1]))
                break
            raise ValueError(f"{output} line {i + 1}: not valid JSON; fix or delete the file") from None
        if "id" not in rec:
            raise ValueError(f"{output} line {i + 1}: no field 'id' (not a build-cod output)")
        done[rec["id"]] = rec
    return done


def write_counts(output: Path, stats: dict[str, dict]) -> None:
    """`<output>.counts.json` and a Markdown table `<output>.counts.md`."""
    base = output.with_name(output.name.removesuffix(".jsonl"))
    Path(f"{base}.counts.json").write_text(json.dumps(stats, indent=1))
    cols = ["available", "selected", "upsampled", "written", "dropped"]
    lines = ["| category | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for c, s in stats.items():
        lines.append(f"| {c} | " + " | ".join(str(s.get(k, 0)) for k in cols) + " |")
    Path(f"{base}.counts.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- the command
def build_cod(
    sources: list[PromptSource],
    output: str,
    policy: PolicyConfig,
    generator: Optional[PolicyConfig] = None,
    categories: Optional[list[str]] = None,
    unmapped: Unmapped = "error",
    uncategorized: Literal["error", "skip", "other", "classify"] = "error",
    keyword_rules: bool = True,
    balance_mode: Literal["down", "up", "none"] = "down",
    per_category: Optional[int] = None,
    cod_sampling: Optional[SamplingConfig] = None,
    rejected_sampling: Optional[SamplingConfig] = None,
    max_retries: int = 2,
    one_shot: bool = False,
    batch_size: int = 8,
    seed: int = 0,
    limit: Optional[int] = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Build the balanced Chain-of-Draft safety preference set (SRMIR, SPEC B1).

    Args:
        sources: Harmful-prompt files with a category label (HarmBench, AdvBench, StrongREJECT,
            refusal_direction, PKU-SafeRLHF, or any prompt + category file).
        output: The JSONL file to write. A re-run appends, skipping prompts already written.
        policy: The policy: samples the rejected response on the bare prompt.
        generator: The LM that writes CoD refusals; None: the policy itself.
        categories: Categories to build; None: the seven (plus `other` when any prompt has it).
        unmapped: A label missing from its mapping table: error, other (bucket) or skip (counted).
        uncategorized: A row without a label: error, skip, other, or classify (a bag-of-words
            classifier trained on the labelled sources).
        keyword_rules: Move suicide / self-harm / eating-disorder prompts into mental_health.
        balance_mode: down-sample to the smallest category, up-sample to the largest (with
            replacement, logged), or none.
        per_category: Target count per category instead of the smallest / largest.
        cod_sampling: Sampling for the CoD refusal (default: 128 new tokens, temperature 0.7).
        rejected_sampling: Sampling for the rejected response (default: 128 tokens, temperature 1).
        max_retries: Re-sample a CoD without a `####` answer this many times, then drop the prompt.
        one_shot: Show the generator one worked CoD example (DEMONSTRATION) before the SPEC prompt.
        batch_size: Prompts generated per batch.
        seed: Seed for selection and sampling.
        limit: Stop after writing this many new records (chunked runs).
        progress: Show a progress bar.

    Returns:
        Per-category counts {available, selected, upsampled, written, dropped}, also written to
        `<output>.counts.json` and `<output>.counts.md`.
    """
    if not logging.getLogger().handlers:  # run as a command: show the counts and skips
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cod_sampling = cod_sampling or SamplingConfig(max_new_tokens=128, temperature=0.7)
    rejected_sampling = rejected_sampling or SamplingConfig(max_new_tokens=128, temperature=1.0)
    rows = collect_prompts(sources, unmapped, uncategorized, keyword_rules, seed)
    if categories is None:
        categories = list(CATEGORIES) + ([OTHER] if any(r["category"] == OTHER for r in rows) else [])
    plan, stats = balance(rows, categories, balance_mode, per_category, seed)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    todo = [r for r in plan if r["id"] not in done]
    log.info("build-cod: %d planned, %d already written, %d to generate", len(plan), len(plan) - len(todo), len(todo))
    dropped: Counter = Counter()
    if todo and limit != 0:
        tokenizer = load_tokenizer(policy)
        policy_gen = LeanGenerator(load_causal_lm(policy, with_lora=False).eval(), tokenizer)
        cod_gen = policy_gen
        if generator is not None and generator != policy:
            cod_gen = LeanGenerator(load_causal_lm(generator, with_lora=False).eval(), load_tokenizer(generator))
        settings = {
            "generator": (generator or policy).name_or_path,
            "policy": policy.name_or_path,
            "cod_sampling": asdict(cod_sampling),
            "rejected_sampling": asdict(rejected_sampling),
            "one_shot": one_shot,
        }
        written = 0
        position = {r["id"]: i for i, r in enumerate(plan)}
        with out.open("a") as f, tqdm(total=len(todo), desc="build-cod", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                if limit is not None:
                    batch = batch[: limit - written]
                batch_seed = seed + position[batch[0]["id"]]  # tied to the plan, not to the resume point
                records = generate_batch(batch, cod_gen, policy_gen, cod_sampling, rejected_sampling, max_retries,
                                         batch_seed, one_shot)
                for row, rec in zip(batch, records):
                    if rec is None:
                        dropped[row["category"]] += 1
                        continue
                    rec["generation"] = dict(settings, seed=batch_seed, attempts=rec.pop("attempts"))
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    written += 1
                bar.update(len(batch))
                if limit is not None and written >= limit:
                    break
    if sum(dropped.values()):
        log.warning("dropped %d prompts whose CoD had no '%s' answer after %d retries: %s",
                    sum(dropped.values()), SEPARATOR, max_retries, dict(dropped))
    planned = {r["id"] for r in plan}
    in_file = Counter(rec["category"] for rec in read_done(out).values() if rec["id"] in planned)
    outside = len(read_done(out)) - sum(in_file.values())
    if outside:
        log.warning("%s holds %d records outside this plan (another per_category or seed); not counted", out, outside)
    for c in stats:
        stats[c].update(written=in_file.get(c, 0), dropped=dropped.get(c, 0))
    write_counts(out, stats)
    return stats


def generate_batch(
    batch: list[dict], cod_gen: Generator, policy_gen: Generator, cod_sampling: SamplingConfig,
    rejected_sampling: SamplingConfig, max_retries: int, seed: int, one_shot: bool = False,
) -> list[Optional[dict]]:
    """One record per row (None where no valid CoD came out within `max_retries`)."""
    prompts = [r["prompt"] for r in batch]
    cods: list[Optional[str]] = [None] * len(batch)
    attempts = [0] * len(batch)
    for attempt in range(max_retries + 1):
        pending = [i for i, c in enumerate(cods) if c is None]
        if not pending:
            break
        texts = cod_gen.generate([cod_messages(prompts[i], one_shot) for i in pending], cod_sampling, batch_size=len(pending),
                                 seed=seed + 7919 * attempt, progress=False)
        for i, text in zip(pending, texts):
            attempts[i] = attempt + 1
            if is_valid_cod(text):
                cods[i] = text.strip()
    keep = [i for i, c in enumerate(cods) if c is not None]
    rejected = policy_gen.generate([prompts[i] for i in keep], rejected_sampling, batch_size=max(len(keep), 1),
                                   seed=seed, progress=False) if keep else []
    records: list[Optional[dict]] = [None] * len(batch)
    for i, rej in zip(keep, rejected):
        row = batch[i]
        records[i] = {
            "id": row["id"], "prompt": row["prompt"], "category": row["category"], "source": row["source"],
            "source_category": row["source_category"], "chosen": cods[i], "rejected": rej.strip(),
            "attempts": attempts[i],
        }
    return records
