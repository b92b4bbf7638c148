"""`lit-align build-pairs`: safety preference pairs from the policy's own answers and refusals.

    harmful prompt:   chosen = the policy's refusal of it,   rejected = the policy's own answer
    harmless prompt:  chosen = the policy's own answer,      rejected = the policy's refusal of it

A refusal is the policy's own greedy continuation of a refusal opener ("I'm sorry, but I
can't"), cut after its first sentence. On a harmful prompt that is the refusal we want; on a
harmless one it is how an over-refusing model answers ("I'm sorry, but I can't help with a 10 by
10 multiplication table."), the answer to push down. Both sides of every pair are the policy's
own text, and a harmful pair differs from a harmless one only in its prompt: what the model has
to learn is *when* to refuse.

Training prompts too close to an evaluation prompt are dropped before anything is generated
(`near_duplicates`). Generations are appended to `<output>.generations.jsonl` batch by batch,
keyed by prompt text under a header of what they depend on (the weights' content fingerprint,
opener, lengths): an interrupted run resumes where it stopped, and a run with other settings is
refused rather than mixed in.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from lit_align.data.render import render_prompt
from lit_align.eval.judges import RefusalPhraseJudge
from lit_align.eval.prompts import PromptSetConfig, load_prompt_set
from lit_align.generation import LeanGenerator, SamplingConfig
from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

GENERATIONS_FORMAT = 2  # 2: a settings header; records keyed by prompt text

# ---------------------------------------------------------------------------- contamination guard
_STOPWORDS = frozenset(
    "a an the of to in on for and or with how do i can what is are be my me you your it its this that by from "
    "at as into about which who why when where does did should would could get make use using give write "
    "provide create some any best way ways".split()
)


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOPWORDS)


def near_duplicates(candidates: list[str], references: list[str], max_overlap: float = 0.8, min_words: int = 3) -> list[Optional[str]]:
    """For each candidate, the reference it is closest to when that is too close (else None).

    Close means the same content words, or |A ∩ B| / min(|A|, |B|) ≥ `max_overlap` when both have
    at least `min_words` content words: "How do I kill a Python process that is not responding?"
    is close to "How can I kill a Python process?" (3 of 3 shared)."""
    postings: dict[str, list[int]] = defaultdict(list)
    ref_words = [content_words(r) for r in references]
    for j, words in enumerate(ref_words):
        for w in words:
            postings[w].append(j)
    out: list[Optional[str]] = []
    for text in candidates:
        words = content_words(text)
        shared = Counter(j for w in words for j in postings.get(w, ()))
        hit = None
        for j, n in shared.most_common():
            small = min(len(words), len(ref_words[j]))
            if words == ref_words[j] or (small >= min_words and n / small >= max_overlap):
                hit = references[j]
                break
        out.append(hit)
    return out


# ---------------------------------------------------------------------------- generation
def first_sentence(text: str, start: int = 0) -> str:
    """Up to and including the first sentence end (. ! ? followed by a space) or line break at or
    after `start` (the end of a forced opener, so that an opener "I'm sorry." is not all that is kept)."""
    end = re.compile(r"[.!?](?=\s|$)|\n").search(text, start)
    return text[: end.end()].rstrip() if end else text.rstrip()


def encode_with_opener(tokenizer, prompts: list[str], opener: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids of each chat-rendered prompt with the assistant turn begun by `opener`."""
    texts = [render_prompt(tokenizer, p) + opener for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def generation_settings(policy: PolicyConfig, opener: str, answer_tokens: int, refusal_tokens: int) -> dict:
    """What a stored generation depends on; a resumed run must match it."""
    from lit_align.modules.refcache import model_fingerprint

    try:
        weights = model_fingerprint(policy)
    except FileNotFoundError:  # a hub id not downloaded yet: its name and revision stand for it
        weights = f"{policy.name_or_path}@{policy.revision}"
    return {"format": GENERATIONS_FORMAT, "policy": policy.name_or_path, "weights": weights, "dtype": policy.dtype,
            "opener": opener, "answer_tokens": answer_tokens, "refusal_tokens": refusal_tokens}  # fmt: skip


def read_generations(path: Path, settings: dict) -> dict[str, dict]:
    """`{prompt: {answer, refusal}}` stored in `path` (a header line with the settings, then one
    record per prompt). A torn last line, left by an interrupted write, is cut off so that the next
    append starts on a clean line; any other unreadable line is an error naming it."""
    if not path.is_file() or path.stat().st_size == 0:
        path.write_text(json.dumps({"settings": settings}) + "\n")
        return {}
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("build-pairs: %s ends in a torn line (%d bytes); it is generated again", path, len(data) - cut)
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    lines = data.decode("utf-8").splitlines()
    header = _parse(path, 1, lines[0]) if lines else {}
    if "settings" not in header:
        raise ValueError(f"{path} line 1: no settings header (a file of an older build-pairs, which recorded neither "
                         "prompts nor settings); delete it to generate again, or choose another `output`")  # fmt: skip
    if header["settings"] != settings:
        stored = header["settings"]
        differ = sorted(k for k in {*stored, *settings} if stored.get(k) != settings.get(k))
        raise ValueError(
            f"{path} line 1: generated with other settings ({', '.join(differ)} differ: {stored} vs {settings}); "
            "delete it to generate again, or choose another `output`"
        )
    done = {}
    for n, line in enumerate(lines[1:], start=2):
        rec = _parse(path, n, line)
        for key in ("prompt", "answer", "refusal"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{path} line {n}: field {key!r} is missing or not text; delete the line to generate it again")
        done[rec["prompt"]] = rec
    return done


def _parse(path: Path, n: int, line: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {n}: not JSON ({err}); delete the line to generate it again") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{path} line {n}: not a JSON object")
    return rec


def generate_missing(rows: list[dict], path: Path, policy: PolicyConfig, opener: str, answer_tokens: int,
                     refusal_tokens: int, batch_size: int, progress: bool) -> dict[str, dict]:
    """`{prompt: {answer, refusal}}` for every row, generated greedily where `path` lacks them and
    appended to it batch by batch. Keyed by prompt text: the same prompt in two sets is generated once."""
    done = read_generations(path, generation_settings(policy, opener, answer_tokens, refusal_tokens))
    todo = list({r["prompt"]: r for r in rows if r["prompt"] not in done}.values())
    if not todo:
        return done
    log.info("build-pairs: generating for %d prompts (%d read from %s)", len(todo), len(done), path)
    tokenizer = load_tokenizer(policy)
    generator = LeanGenerator(load_causal_lm(policy, with_lora=False).eval(), tokenizer)
    greedy = SamplingConfig(max_new_tokens=answer_tokens, temperature=0.0)
    greedy_refusal = SamplingConfig(max_new_tokens=refusal_tokens, temperature=0.0)
    with path.open("a") as f:
        for start in tqdm(range(0, len(todo), batch_size), desc="own answers and refusals", disable=not progress):
            batch = todo[start : start + batch_size]
            prompts = [r["prompt"] for r in batch]
            answers = generator.generate_ids(*generator.encode_prompts(prompts), greedy).texts
            refusals = generator.generate_ids(*encode_with_opener(tokenizer, prompts, opener), greedy_refusal).texts
            for row, answer, cont in zip(batch, answers, refusals):
                rec = {"id": row["id"], "prompt": row["prompt"], "answer": answer.strip(),
                       "refusal": first_sentence(opener + cont, len(opener))}  # fmt: skip
                done[row["prompt"]] = rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
    return done


# ---------------------------------------------------------------------------- the command
def load_prompts(sets: list[PromptSetConfig], harmful: bool, stats: dict[str, Counter]) -> list[dict]:
    """The rows of `sets`, each prompt once (a repeat, within or across sets, is counted as
    `duplicate` in its set). A set or row labelled the other way than its list is an error: its own
    `harmful`, or its preset's label (HarmBench, AdvBench, StrongREJECT harmful; XSTest per row);
    a `custom` set without `harmful` takes its list's."""
    kind = "harmful" if harmful else "harmless"
    rows, seen = [], set()
    for cfg in sets:
        if cfg.harmful is not None and cfg.harmful != harmful:
            raise ValueError(f"prompt set {cfg.label!r} ({cfg.path}) says harmful: {cfg.harmful} but is listed under "
                             f"`{kind}`; move it or drop its `harmful`")  # fmt: skip
        for row in load_prompt_set(cfg):
            if row["harmful"] != harmful and (cfg.harmful is not None or cfg.preset != "custom"):
                raise ValueError(f"{cfg.path} row {row['id'].rsplit(':', 1)[-1]}: labelled {'harmful' if row['harmful'] else 'harmless'} "
                                 f"in a set listed under `{kind}`; filter it out (`filters`) or set `harmful`")  # fmt: skip
            stats[row["set"]]["loaded"] += 1
            key = " ".join(row["prompt"].lower().split())
            if key in seen:
                stats[row["set"]]["duplicate"] += 1
                continue
            seen.add(key)
            rows.append(dict(row, harmful=harmful))
    return rows


def check_options(harmful: list[PromptSetConfig], harmless: list[PromptSetConfig], max_overlap: float) -> None:
    """Refuse a run without both lists, an overlap outside (0, 1] or two sets of one name."""
    if not harmful or not harmless:
        raise ValueError("build-pairs needs both `harmful` and `harmless` prompt sets")
    if not 0 < max_overlap <= 1:
        raise ValueError(f"max_overlap={max_overlap}: choose a value in (0, 1]")
    labels = [cfg.label for cfg in [*harmful, *harmless]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"build-pairs: prompt set names {labels} repeat; give each a `name`")


def drop_near_evaluation_prompts(
    rows: list[dict], exclude: list[PromptSetConfig], max_overlap: float, stats: dict[str, Counter]
) -> list[dict]:
    """The rows not close to any prompt of `exclude` (each dropped one counted and logged)."""
    references = [r["prompt"] for cfg in exclude for r in load_prompt_set(cfg)]
    kept = []
    for row, hit in zip(rows, near_duplicates([r["prompt"] for r in rows], references, max_overlap)):
        if hit is None:
            kept.append(row)
        else:
            stats[row["set"]]["near_evaluation_prompt"] += 1
            log.info("build-pairs: dropped %r (close to evaluation prompt %r)", row["prompt"], hit)
    return kept


def build_pairs(
    harmful: list[PromptSetConfig],
    harmless: list[PromptSetConfig],
    output: str,
    policy: PolicyConfig,
    exclude: Optional[list[PromptSetConfig]] = None,
    refusal_opener: str = "I'm sorry, but I can't",
    answer_tokens: int = 64,
    refusal_tokens: int = 32,
    max_overlap: float = 0.8,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Build refusal / compliance preference pairs from the policy's own greedy text.

    Args:
        harmful: Prompt sets the policy should refuse (e.g. {preset: custom, path:
            ../shared/data/refusal_direction/harmful_train.json, text_column: instruction}).
        harmless: Prompt sets the policy should answer (e.g. Alpaca instructions, borderline requests).
        output: The pairs JSONL (prompt, chosen, rejected, category, kind, set, and id = "<set>/<file
            name>:<row>", unique even when two sets read files of the same name). Beside it:
            `<output>.generations.jsonl` (resumable) and `<output>.stats.json`.
        policy: The model whose answers and refusals make the pairs.
        exclude: Evaluation prompt sets: a training prompt too close to any of their prompts is dropped.
        refusal_opener: How a refusal starts; the policy continues it greedily to its first sentence end.
        answer_tokens: Longest own answer, in tokens.
        refusal_tokens: Tokens generated after the opener (the first sentence is kept).
        max_overlap: Content-word overlap at or above which a training prompt counts as a copy of an
            evaluation prompt (see `near_duplicates`).
        batch_size: Prompts per generation batch.
        progress: Show a progress bar.

    Returns:
        Counts per prompt set: loaded, duplicate (a prompt seen before), near_evaluation_prompt
        (dropped), skipped_empty_answer, skipped_already_refuses (a harmful prompt the policy
        already refuses), skipped_answer_is_refusal (a harmless prompt it refuses), pairs.
    """
    check_options(harmful, harmless, max_overlap)
    stats: dict[str, Counter] = defaultdict(Counter)
    rows = load_prompts(harmful, True, stats) + load_prompts(harmless, False, stats)
    kept = drop_near_evaluation_prompts(rows, exclude or [], max_overlap, stats)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    generations = generate_missing(kept, out.with_suffix(".generations.jsonl"), policy, refusal_opener,
                                   answer_tokens, refusal_tokens, batch_size, progress)
    pairs = assemble(kept, generations, stats)
    with out.open("w") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    result = {name: dict(counts) for name, counts in stats.items()}
    out.with_suffix(".stats.json").write_text(json.dumps(result, indent=1))
    log.info("build-pairs: %d pairs in %s; %s", len(pairs), out, result)
    return result


def assemble(rows: list[dict], generations: dict[str, dict], stats: dict[str, Counter]) -> list[dict]:
    """One pair per row. Skipped (counted) where the policy's own answer is empty (nothing to
    prefer or push down) or a refusal: a harmful prompt it already refuses gives no compliant
    answer to push down, a harmless one it refuses gives no answer to prefer."""
    judge = RefusalPhraseJudge("jailbreakbench")
    pairs = []
    for row in rows:
        gen = generations[row["prompt"]]
        answer, refusal = gen["answer"], gen["refusal"]
        if not answer:
            stats[row["set"]]["skipped_empty_answer"] += 1
            continue
        answer_refuses = judge.is_refusal(answer)
        if row["harmful"] and answer_refuses:
            stats[row["set"]]["skipped_already_refuses"] += 1
            continue
        if not row["harmful"] and answer_refuses:
            stats[row["set"]]["skipped_answer_is_refusal"] += 1
            continue
        chosen, rejected = (refusal, answer) if row["harmful"] else (answer, refusal)
        pairs.append({
            "id": f"{row['set']}/{row['id']}", "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
            "category": row["category"] if row["harmful"] else None,
            "kind": "harmful" if row["harmful"] else "harmless", "set": row["set"],
        })  # fmt: skip
        stats[row["set"]]["pairs"] += 1
    return pairs
