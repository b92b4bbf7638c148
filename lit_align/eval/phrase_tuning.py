"""A refusal phrase list tuned on one model's labelled completions (to be tested on another's).

Greedy edits of a starting list (JailbreakBench's), each the one that most lowers the number of
training rows the `anywhere` rule gets wrong:

    errors(P) = Σ_i [ refused_i ≠ (response_i is empty or ∃ p ∈ P: p ⊂ norm(response_i)) ]
    step:       P ← argmin over { P ∪ {c} : c a candidate } ∪ { P ∖ {p} : p ∈ P } of errors
    stop when   errors(P) − errors(P_next) < min_gain

Candidates are the word n-grams (n in `ngrams`) of the training refusals that occur in at least
`min_support` of them, with punctuation stripped at their ends. `norm` is the judge's: typographic
apostrophes straightened and, unless `case_sensitive`, lower case. Only the training file's
labels are read, so scoring the list on another model's completions is a held-out test.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from lit_align.eval.judges import JAILBREAKBENCH_PHRASES, RefusalPhraseJudge

_EDGE = ".,;:!?\"'()[]*_`-"


@dataclass
class TunedPhrases:
    """A tuned list and how it was reached."""

    phrases: list[str]
    """The final list (normalised as the judge matches it)."""
    steps: list[dict] = field(default_factory=list)
    """Each edit: {"action": "add" | "remove", "phrase", "errors"} (training errors after it)."""
    start_errors: int = 0
    """Training errors of the starting list."""


def candidate_ngrams(texts: Sequence[str], ngrams: tuple[int, int], min_support: int) -> list[str]:
    """Word n-grams found in at least `min_support` of `texts` (each text counted once)."""
    counts: Counter = Counter()
    for text in texts:
        words = text.split()
        grams = set()
        for n in range(ngrams[0], ngrams[1] + 1):
            for i in range(len(words) - n + 1):
                gram = " ".join(words[i : i + n]).strip(_EDGE)
                if gram:
                    grams.add(gram)
        counts.update(grams)
    return sorted(g for g, c in counts.items() if c >= min_support)


def _mask(phrase: str, texts: list[str]) -> int:
    """Bit i set when `phrase` occurs in texts[i]."""
    return sum(1 << i for i, t in enumerate(texts) if phrase in t)


def tune_phrases(
    responses: Sequence[str],
    refused: Sequence[bool],
    base: Sequence[str] = JAILBREAKBENCH_PHRASES,
    ngrams: tuple[int, int] = (2, 4),
    min_support: int = 3,
    min_gain: int = 3,
    max_steps: int = 40,
    case_sensitive: bool = False,
) -> TunedPhrases:
    """Tune `base` on (responses, human refusal labels) by greedy additions and removals (see the
    module docstring). Ties go to the fewer-word, then alphabetically first, phrase."""
    if len(responses) != len(refused) or not responses:
        raise ValueError(f"tune_phrases: {len(responses)} responses and {len(refused)} labels; give equal, non-zero counts")
    if not 1 <= ngrams[0] <= ngrams[1] or min_support < 1 or min_gain < 1:
        raise ValueError(f"tune_phrases: ngrams={ngrams} (1 ≤ low ≤ high), min_support={min_support}, min_gain={min_gain} (≥ 1)")
    norm = RefusalPhraseJudge(list(base) or ["-"], case_sensitive=case_sensitive)._norm
    texts = [norm(r).strip() for r in responses]
    truth = sum(1 << i for i, y in enumerate(refused) if y)
    empty = sum(1 << i for i, t in enumerate(texts) if not t)  # the judge calls an empty response a refusal
    masks = {p: _mask(p, texts) for p in dict.fromkeys(norm(p) for p in base)}
    refusals = [t for t, y in zip(texts, refused) if y]
    for gram in candidate_ngrams(refusals, ngrams, min_support):
        masks.setdefault(gram, _mask(gram, texts))

    def errors(phrases) -> int:
        pred = empty
        for p in phrases:
            pred |= masks[p]
        return (pred ^ truth).bit_count()

    current = list(dict.fromkeys(norm(p) for p in base))
    out = TunedPhrases(phrases=[], start_errors=errors(current))
    now = out.start_errors
    for _ in range(max_steps):
        moves = [("add", c, errors(current + [c])) for c in masks if c not in current]
        moves += [("remove", p, errors([q for q in current if q != p])) for p in current]
        action, phrase, after = min(moves, key=lambda m: (m[2], len(m[1].split()), m[1], m[0]))
        if now - after < min_gain:
            break
        current = current + [phrase] if action == "add" else [q for q in current if q != phrase]
        now = after
        out.steps.append({"action": action, "phrase": phrase, "errors": after})
    out.phrases = current
    return out
