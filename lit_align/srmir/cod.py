"""`lit-align build-cod`: the balanced Chain-of-Draft (CoD) safety preference set (SPEC B1).

sources -> map onto the seven categories -> de-duplicate -> balance -> for each prompt a CoD
refusal from the generator LM (chosen) and a policy sample on the bare prompt (rejected) ->
JSONL, one record per line, appended and flushed as it goes so that a re-run resumes. A prompt
whose CoD never holds a `####` answer is replaced by another prompt of its category, so the
categories stay balanced while their prompts last.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict, deque
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

from tqdm.auto import tqdm

from lit_align.generation import Generator, LeanGenerator, SamplingConfig
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
) -> tuple[list[dict], dict[str, dict], dict[str, list[dict]]]:
    """Equal counts per category. Returns the plan (categories interleaved, so a partial run is
    still balanced), per-category stats {available, selected, upsampled} and each category's
    reserve: the prompts that replace planned ones whose CoD fails (the rest of the shuffled
    pool; with `up`, then every prompt once more as a new copy)."""
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
    stats, picked, reserve = {}, {}, {}
    for c in categories:
        # one seeded shuffle per category: a larger per_category extends the plan of a smaller
        # one, so a re-run with more prompts per category keeps what is already written
        rng = random.Random(f"{seed}:{c}")
        pool = list(by_cat[c])
        rng.shuffle(pool)
        n = len(pool) if target is None else target
        chosen = pool[:n]
        copies = rng.choices(pool, k=max(0, n - len(pool)))
        if mode == "up":  # drawn with replacement anyway: a failed prompt may be replaced by a copy
            copies += rng.sample(pool, len(pool))
        copies = [dict(r, id=f"{r['id']}#{k + 1}") for k, r in enumerate(copies)]
        extra = copies[: max(0, n - len(pool))]
        picked[c] = chosen + extra
        reserve[c] = pool[n:] + copies[len(extra):]
        stats[c] = {"available": len(pool), "selected": len(chosen), "upsampled": len(extra)}
        if extra:
            log.info("category %s: up-sampled %d copies to reach %d", c, len(extra), n)
    plan = interleave([picked[c] for c in categories])
    return plan, stats, reserve


def interleave(lists: list[list]) -> list:
    """[a0, b0, c0, a1, b1, ...]: one from each list in turn."""
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


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
    cols = ["available", "selected", "upsampled", "planned", "dropped", "replaced", "written", "short"]
    lines = ["| category | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for c, s in stats.items():
        lines.append(f"| {c} | " + " | ".join(str(s.get(k, 0)) for k in cols) + " |")
    Path(f"{base}.counts.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- the command
def resume_plan(
    plan: list[dict], reserve: dict[str, list[dict]], categories: list[str], stats: dict[str, dict], done: dict[str, dict]
) -> tuple[list[dict], dict[str, deque], list[dict]]:
    """`(order, queues, todo)`: every row in plan-then-reserve order (a row's place is its sampling
    seed), each category's rows not yet written, and the rows still to generate (interleaved)."""
    order = plan + interleave(list(reserve.values()))
    in_file = Counter(done[r["id"]]["category"] for r in order if r["id"] in done)
    queues = {c: deque(r for r in order if r["category"] == c and r["id"] not in done) for c in categories}
    need = {c: max(0, s["selected"] + s["upsampled"] - in_file[c]) for c, s in stats.items()}
    todo = interleave([[queues[c].popleft() for _ in range(min(need[c], len(queues[c])))] for c in categories])
    log.info("build-cod: %d planned, %d already written, %d to generate", len(plan), sum(in_file.values()), len(todo))
    return order, queues, todo


def build_cod(
    sources: list[PromptSource], output: str, policy: PolicyConfig, generator: Optional[PolicyConfig] = None,
    categories: Optional[list[str]] = None, unmapped: Unmapped = "error",
    uncategorized: Literal["error", "skip", "other", "classify"] = "error", keyword_rules: bool = True,
    balance_mode: Literal["down", "up", "none"] = "down", per_category: Optional[int] = None,
    cod_sampling: Optional[SamplingConfig] = None, rejected_sampling: Optional[SamplingConfig] = None,
    max_retries: int = 2, one_shot: bool = False, batch_size: int = 8, seed: int = 0,
    limit: Optional[int] = None, progress: bool = True,
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
        max_retries: Re-sample a CoD without a `####` answer this many times; then the prompt is
            dropped and replaced by the next prompt of its category (the rest of its shuffled
            pool; with balance_mode=up, then copies), until the category reaches its count or
            those run out (the `short` count).
        one_shot: Show the generator one worked CoD example (DEMONSTRATION) before the SPEC prompt.
        batch_size: Prompts generated per batch.
        seed: Seed for selection and sampling.
        limit: Stop after writing this many new records (chunked runs).
        progress: Show a progress bar.

    Returns:
        Per-category counts {available, selected, upsampled, planned (before), dropped, replaced,
        written (after), short}, also logged and written to `<output>.counts.json` and
        `<output>.counts.md`.
    """
    if not logging.getLogger().handlers:  # run as a command: show the counts and skips
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cod_sampling = cod_sampling or SamplingConfig(max_new_tokens=128, temperature=0.7)
    rejected_sampling = rejected_sampling or SamplingConfig(max_new_tokens=128, temperature=1.0)
    rows = collect_prompts(sources, unmapped, uncategorized, keyword_rules, seed)
    if categories is None:
        categories = list(CATEGORIES) + ([OTHER] if any(r["category"] == OTHER for r in rows) else [])
    plan, stats, reserve = balance(rows, categories, balance_mode, per_category, seed)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    order, queues, todo = resume_plan(plan, reserve, categories, stats, read_done(out))
    dropped, replaced = Counter(), Counter()
    if todo and limit != 0:
        generate_all(todo, queues, order, out, policy, generator, cod_sampling, rejected_sampling, max_retries,
                     one_shot, batch_size, seed, limit, progress, dropped, replaced)
    return report_counts(out, stats, order, dropped, replaced, max_retries)


def generate_all(
    todo: list[dict], queues: dict[str, deque], order: list[dict], out: Path, policy: PolicyConfig,
    generator: Optional[PolicyConfig], cod_sampling: SamplingConfig, rejected_sampling: SamplingConfig,
    max_retries: int, one_shot: bool, batch_size: int, seed: int, limit: Optional[int], progress: bool,
    dropped: Counter, replaced: Counter,
) -> None:
    """Generate `todo` batch by batch, appending records to `out`; a prompt whose CoD fails is
    replaced by the next prompt of its category's queue (counted in `dropped` / `replaced`)."""
    tokenizer = load_tokenizer(policy)
    policy_gen = LeanGenerator(load_causal_lm(policy, with_lora=False).eval(), tokenizer)
    cod_gen = policy_gen
    if generator is not None and generator != policy:
        cod_gen = LeanGenerator(load_causal_lm(generator, with_lora=False).eval(), load_tokenizer(generator))
    settings = {
        "generator": (generator or policy).name_or_path, "policy": policy.name_or_path,
        "cod_sampling": asdict(cod_sampling), "rejected_sampling": asdict(rejected_sampling), "one_shot": one_shot,
    }
    position = {r["id"]: i for i, r in enumerate(order)}
    pending, written = deque(todo), 0
    with out.open("a") as f, tqdm(total=len(todo), desc="build-cod", disable=not progress) as bar:
        while pending and (limit is None or written < limit):
            size = batch_size if limit is None else min(batch_size, limit - written)
            batch = [pending.popleft() for _ in range(min(size, len(pending)))]
            batch_seed = seed + position[batch[0]["id"]]  # tied to the plan, not to the resume point
            records = generate_batch(batch, cod_gen, policy_gen, cod_sampling, rejected_sampling, max_retries,
                                     batch_seed, one_shot)
            for row, rec in zip(batch, records):
                category = row["category"]
                if rec is None:
                    dropped[category] += 1
                    if queues[category]:  # keep the category at its count while its source lasts
                        pending.append(queues[category].popleft())
                        replaced[category] += 1
                        bar.total += 1
                    continue
                rec["generation"] = dict(settings, seed=batch_seed, attempts=rec.pop("attempts"))
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                written += 1
            bar.update(len(batch))


def report_counts(
    out: Path, stats: dict[str, dict], order: list[dict], dropped: Counter, replaced: Counter, max_retries: int
) -> dict[str, dict]:
    """Per-category counts before (planned) and after (written), logged and written next to `out`."""
    if sum(dropped.values()):
        log.warning("%d prompts had no '%s' answer after %d retries (%s); %d replaced by another prompt of "
                    "their category", sum(dropped.values()), SEPARATOR, max_retries, dict(dropped), sum(replaced.values()))
    known = {r["id"] for r in order}
    done = read_done(out)
    in_file = Counter(rec["category"] for rec in done.values() if rec["id"] in known)
    if len(done) > sum(in_file.values()):
        log.warning("%s holds %d records outside this plan (another seed or sources); not counted",
                    out, len(done) - sum(in_file.values()))
    for c, s in stats.items():
        planned = s["selected"] + s["upsampled"]
        s.update(planned=planned, dropped=dropped[c], replaced=replaced[c], written=in_file[c],
                 short=max(0, planned - in_file[c]))
        log.info("category %s: planned %d, written %d (dropped %d, replaced %d)", c, planned, in_file[c],
                 dropped[c], replaced[c])
    short = {c: s["short"] for c, s in stats.items() if s["short"]}
    if short:
        log.warning("categories short of their count (source exhausted, or an interrupted run): %s", short)
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
