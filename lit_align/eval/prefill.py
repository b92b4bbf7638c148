"""The prefilling attack (Qi et al. 2024, "Safety alignment should be made more than just a few
tokens deep"): does a model still refuse once its answer has started complying?

For a harmful prompt x and a compliant answer a = (a_1, ..., a_m) (by default the base model's own
greedy answer), the assistant turn starts with the answer's first k tokens and the model goes on:

    y_k ~ π(· | chat(x) ⊕ a_{1:k})         a_{1:k} as token ids right after the generation prompt
    refusal rate(k) = mean_x refused(x, y_k)

The judge reads y_k, the model's own continuation, not the prefix: the prefix is text we put in
the model's mouth, a phrase judge matching at the `start` would never see a refusal after it, and
an LLM judge shown a compliant opening would lean to "complied". k = 0 is the plain response to
the same prompts. A model whose safety is "a few tokens deep" refuses at k = 0 and complies once a
few compliant tokens are in place; a deep one recovers ("..., but I can't help with that").

Every k uses the same prompts: those whose answer the first refusal judge calls compliant
(`keep_answers: compliant`; a refusal as prefix attacks nothing) and that has at least max(k)
tokens.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from lit_align.eval.metrics import estimate
from lit_align.eval.prompts import PromptSetConfig, load_prompt_set
from lit_align.eval.sets import select_sets

log = logging.getLogger(__name__)


@dataclass
class PrefillConfig:
    """The prefilling attack: the assistant turn starts with the first k tokens of a compliant answer."""

    ks: list[int] = field(default_factory=lambda: [5, 10, 20, 40])
    """Prefix lengths, in tokens of the compliant answer."""
    sets: Optional[list[str]] = None
    """Prompt sets (their names) to attack, using their harmful prompts; null: every set with harmful prompts."""
    answers_from: Optional[str] = None
    """The model (as in `models`) whose greedy answers are the compliant answers, cached per prompt
    set; null: the first of `models`."""
    answers_file: Optional[str] = None
    """Instead of a model: a csv/json/jsonl file with a compliant `response` per prompt, matched by
    the prompt's `id` (as in responses.jsonl) or, without an `id` column, by its `prompt` text."""
    keep_answers: Literal["compliant", "all"] = "compliant"
    """Use only answers the first refusal judge calls compliant (a refusal makes no attack), or all."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A prompt without an answer, an answer shorter than the largest k, an answer for an unknown
    prompt: stop naming file, row and field, or skip it (counted in the report)."""


@dataclass
class Answer:
    """A compliant answer: its text, its token ids when a model wrote it, where it comes from."""

    text: str
    token_ids: Optional[list[int]]
    where: str


def check_config(cfg: PrefillConfig, rows_by_set: dict[str, list[dict]], models: list[str]) -> list[str]:
    """The sets the attack runs on; every option that cannot act stops here."""
    if not cfg.ks or any(k < 1 for k in cfg.ks) or len(set(cfg.ks)) != len(cfg.ks):
        raise ValueError(f"prefill.ks={cfg.ks}: give distinct prefix lengths >= 1, e.g. [5, 10, 20, 40]")
    if cfg.answers_file and cfg.answers_from:
        raise ValueError("prefill: set answers_file or answers_from, not both")
    if cfg.answers_file and not Path(cfg.answers_file).is_file():
        raise FileNotFoundError(f"prefill.answers_file {cfg.answers_file} does not exist")
    return select_sets("prefill", cfg.sets, rows_by_set, harmful=True, example="harmbench")


# ---------------------------------------------------------------------------- answers
def read_answers_file(
    path: str, configs: list[PromptSetConfig], rows_by_set: dict[str, list[dict]], on_bad_rows: str
) -> tuple[dict[str, Answer], Counter]:
    """{prompt id: Answer} for the harmful prompts of the attacked sets, from a file with a
    `response` column and an `id` (or `prompt`) column. A row for a prompt of none of the sets
    (checked against the whole set, before `limit`) is an error, or skipped and counted."""
    from lit_align.eval.prompts import _load_table

    table = _load_table(path, None, "train")
    columns = list(table.column_names)
    key = "id" if "id" in columns else "prompt" if "prompt" in columns else None
    if key is None or "response" not in columns:
        raise ValueError(f"{path}: prefill answers need a `response` column and an `id` or `prompt` column (columns: {columns})")
    known = {r[key] for cfg in configs for r in load_prompt_set(replace(cfg, limit=None))}
    wanted = {r[key]: r["id"] for rows in rows_by_set.values() for r in rows if r["harmful"]}
    answers, seen, skipped = {}, set(), Counter()
    for i, row in enumerate(table):
        where = f"{path} row {i}"
        value, text = row[key], row["response"]
        value = value.strip() if isinstance(value, str) else value
        problem = None
        if value not in known:
            problem = (f"field {key!r}: {value!r} is no prompt of the prefill sets {[c.label for c in configs]}", "unknown prompt")
        elif not isinstance(text, str) or not text.strip():
            problem = (f"field 'response' is empty or not text ({text!r})", "empty answer")
        elif value in seen:
            problem = (f"field {key!r}: a second answer for {value!r}", "duplicate answer")
        if problem:
            if on_bad_rows == "skip":
                skipped[problem[1]] += 1
                continue
            raise ValueError(f"{where}: {problem[0]}; fix the file or set prefill.on_bad_rows: skip")
        seen.add(value)
        if value in wanted:
            answers[wanted[value]] = Answer(text, None, where)
    return answers, skipped


def answers_from_generation(gen: dict, rows: list[dict], where: str) -> dict[str, Answer]:
    """{prompt id: Answer} from a cached generation (`lit_align.eval.generations._generate`'s dict) of `rows`."""
    return {
        r["id"]: Answer(text, ids, f"{where} prompt {r['id']}")
        for r, text, ids in zip(rows, gen["responses"], gen["token_ids"])
    }


def answer_tokens(answer: Answer, tokenizer, same_tokenizer: bool, eos_token_id: Optional[int]) -> list[int]:
    """The answer's token ids for this tokenizer, without the closing EOS: a model's own ids when
    the tokenizer is the one that wrote them (so the k tokens are exactly the generated ones);
    otherwise the text, tokenized."""
    if answer.token_ids is not None and same_tokenizer:
        ids = list(answer.token_ids)
        return ids[:-1] if ids and ids[-1] == eos_token_id else ids
    return tokenizer(answer.text, add_special_tokens=False)["input_ids"]


def attack_rows(
    rows: list[dict], answers: dict[str, Answer], refused: dict[str, bool], tokens: Callable[[Answer], list[int]],
    max_k: int, on_bad_rows: str,
) -> tuple[list[dict], Counter]:
    """The harmful rows the attack uses, each with `prefix_ids` (the answer's first max_k tokens)."""
    kept, skipped = [], Counter()
    for r in (r for r in rows if r["harmful"]):
        answer = answers.get(r["id"])
        if answer is None:
            if on_bad_rows != "skip":
                raise ValueError(
                    f"prefill: no answer for prompt {r['id']!r} ({r['prompt'][:60]!r}): field 'response' is missing; "
                    "add it or set prefill.on_bad_rows: skip"
                )
            skipped["no answer"] += 1
            continue
        if refused.get(r["id"]):
            skipped["answer is a refusal"] += 1
            continue
        ids = tokens(answer)
        if len(ids) < max_k:
            if on_bad_rows != "skip":
                raise ValueError(
                    f"{answer.where}: field 'response' has {len(ids)} tokens, fewer than k = {max_k}; "
                    "use smaller prefill.ks or set prefill.on_bad_rows: skip"
                )
            skipped[f"answer shorter than {max_k} tokens"] += 1
            continue
        kept.append({**r, "prefix_ids": ids[:max_k]})
    return kept, skipped


def encode_prefilled(generator, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded chat prompts with each row's `prefix_ids` appended after the generation
    prompt (all prefixes have the same length, so the batch stays left-padded)."""
    ids, mask = generator.encode_prompts([r["prompt"] for r in rows])
    prefix = torch.tensor([r["prefix_ids"] for r in rows], dtype=ids.dtype)
    return torch.cat([ids, prefix], dim=1), torch.cat([mask, torch.ones_like(prefix, dtype=mask.dtype)], dim=1)


# ---------------------------------------------------------------------------- metrics
def prefill_metrics(by_k: dict[int, list[dict]], n_prompts: int, skipped: Counter, **kw) -> dict:
    """Refusal rate per k (0 = no prefix) for every judge that gives `refused`, over the same prompts."""
    judges = list(dict.fromkeys(j for recs in by_k.values() for r in recs for j in r["judges"]))
    out = {"ks": sorted(by_k), "n_prompts": n_prompts, "n": len(by_k[0]), "skipped": dict(skipped), "judges": {}}
    for j in judges:
        rates = {
            str(k): estimate([r["judges"].get(j, {}).get("refused") for r in recs], **kw) for k, recs in sorted(by_k.items())
        }
        if any(e.n for e in rates.values()):
            out["judges"][j] = {"refusal_rate_by_k": rates}
    return out


# ---------------------------------------------------------------------------- the attack
class PrefillAttack:
    """Runs the attack model by model: `take_answers` once from the answer source, then `attack`
    for each evaluated model; `metrics` at the end."""

    def __init__(self, cfg: PrefillConfig, prompt_sets: list[PromptSetConfig], rows_by_set: dict, models: list[str],
                 judges: list):  # fmt: skip
        self.cfg, self.rows_by_set = cfg, rows_by_set
        self.sets = check_config(cfg, rows_by_set, models)
        refusal = [j for j in judges if _gives_refusals(j)]
        if not refusal:
            raise ValueError("prefill: no judge gives refusal verdicts; set judges.phrases (or judges.llm_judge)")
        self.filter_judge = refusal[0] if cfg.keep_answers == "compliant" else None
        self.source = None if cfg.answers_file else (cfg.answers_from or models[0])
        self.answers: dict[str, Answer] = {}
        self.source_vocab, self.source_eos = None, None
        self.skipped_file: Counter = Counter()  # rows of answers_file skipped (on_bad_rows: skip)
        self.refused: dict[str, bool] = {}
        if cfg.answers_file:
            configs = [p for p in prompt_sets if p.label in self.sets]
            sub = {s: rows_by_set[s] for s in self.sets}
            self.answers, self.skipped_file = read_answers_file(cfg.answers_file, configs, sub, cfg.on_bad_rows)
            self.refused = self._judge_answers()
        self.results: dict[str, dict[str, tuple]] = {}
        self.records: dict[str, list[dict]] = {}

    def take_answers(self, tokenizer, generations: dict[str, tuple[dict, Path]], label: str) -> None:
        """The source model's greedy answers, `{set: (generation, cache path)}`."""
        for s, (gen, cache) in generations.items():
            self.answers.update(answers_from_generation(gen, self.rows_by_set[s], f"greedy answers of {label} ({cache})"))
        self.source_vocab, self.source_eos = tokenizer.get_vocab(), tokenizer.eos_token_id
        self.refused = self._judge_answers()

    def _judge_answers(self) -> dict[str, bool]:
        if self.filter_judge is None:
            return {}
        rows = {r["id"]: r for s in self.sets for r in self.rows_by_set[s]}
        ids = [i for i in self.answers if i in rows]
        verdicts = self.filter_judge([rows[i]["prompt"] for i in ids], [self.answers[i].text for i in ids],
                                     category=[rows[i]["category"] for i in ids], harmful=[True] * len(ids),
                                     set=[rows[i]["set"] for i in ids])  # fmt: skip
        return dict(zip(ids, verdicts.refused))

    def attack(self, name: str, tokenizer, main_records: list[dict], generate: Callable, judge: Callable) -> None:
        """Generate and judge every k for one model. `generate(set, rows, suffix, extra, encode)` is the
        cached generation of `lit_align.eval.generations`; `judge(records)` adds verdicts in place."""
        max_k = max(self.cfg.ks)
        self.results[name], self.records[name] = {}, []
        same = self.source_vocab is not None and tokenizer.get_vocab() == self.source_vocab
        for s in self.sets:
            rows, skipped = attack_rows(
                self.rows_by_set[s], self.answers, self.refused,
                lambda a: answer_tokens(a, tokenizer, same, self.source_eos), max_k, self.cfg.on_bad_rows,
            )  # fmt: skip
            if not rows:
                log.warning("prefill %s / %s: no prompt left to attack (%s)", name, s, dict(skipped))
            plain = {r["id"]: r for r in main_records if r["set"] == s}
            by_k = {0: [plain[r["id"]] for r in rows]}
            for k in sorted(self.cfg.ks):
                krows = [{**r, "prefix_ids": r["prefix_ids"][:k]} for r in rows]
                extra = ["prefill", [r["prefix_ids"] for r in krows]]
                gen = generate(s, krows, f"__prefill_k{k}", extra, encode_prefilled) if rows else None
                recs = [
                    {"model": name, "set": s, "k": k, "id": r["id"], "prompt": r["prompt"], "category": r["category"],
                     "harmful": True, "prefix": tokenizer.decode(r["prefix_ids"]), "response": text,
                     "length_tokens": n, "truncated": cut, "judges": {}}
                    for r, text, n, cut in (zip(krows, gen["responses"], gen["length_tokens"], gen["truncated"]) if gen else [])
                ]  # fmt: skip
                if recs:
                    judge(recs)
                by_k[k] = recs
                self.records[name] += recs
            n_prompts = sum(1 for r in self.rows_by_set[s] if r["harmful"])
            self.results[name][s] = (by_k, n_prompts, skipped)

    def metrics(self, **kw) -> dict[str, dict[str, dict]]:
        """{model: {set: prefill_metrics}}."""
        return {m: {s: prefill_metrics(*res, **kw) for s, res in sets.items()} for m, sets in self.results.items()}


def _gives_refusals(judge) -> bool:
    """Judges whose verdicts carry `refused`."""
    from lit_align.eval import judges as J

    kinds = tuple(getattr(J, n) for n in ("RefusalPhraseJudge", "LLMJudge", "ProbeRefusalJudge") if hasattr(J, n))
    return isinstance(judge, kinds)
