"""Tokenised examples -> padded tensors (see docs/design.md for the batch keys)."""

from __future__ import annotations

from typing import Optional

import torch

from lit_align.data.render import encode_prompt, encode_response


def truncate(ids: list[int], max_length: Optional[int], keep: str) -> list[int]:
    """Keep the `max_length` first (keep="start") or last (keep="end") tokens."""
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[:max_length] if keep == "start" else ids[-max_length:]


def encode_row(
    tokenizer,
    row: dict,
    mode: str,
    max_prompt_length: Optional[int],
    max_completion_length: Optional[int],
    prompt_truncation: str = "end",
) -> dict:
    """Token ids for one normalised row; raw fields are kept for scorers and logging."""
    out = {k: v for k, v in row.items()}
    if mode == "labeled":
        response_ids = truncate(encode_response(tokenizer, row["response"]), max_completion_length, "start")
        prompt_ids = [] if row["prompt"] is None else encode_prompt(tokenizer, row["prompt"])
        out["input_ids"] = truncate(prompt_ids, max_prompt_length, prompt_truncation) + response_ids
        return out
    out["prompt_ids"] = truncate(encode_prompt(tokenizer, row["prompt"]), max_prompt_length, prompt_truncation)
    if mode == "preference":
        out["chosen_ids"] = truncate(encode_response(tokenizer, row["chosen"]), max_completion_length, "start")
        out["rejected_ids"] = truncate(encode_response(tokenizer, row["rejected"]), max_completion_length, "start")
    return out


def _pad(seqs: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    rows = [([value] * (length - len(s)) + s) if left else (s + [value] * (length - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class Collator:
    """Pads a list of encoded examples into a batch for one mode."""

    RAW_KEYS = ("prompt", "chosen", "rejected", "category", "response", "text")

    def __init__(self, mode: str, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.mode = mode
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def _length(self, lengths: list[int]) -> int:
        n = max(lengths)
        return -(-n // self.multiple) * self.multiple

    def __call__(self, examples: list[dict]) -> dict:
        batch = {"index": torch.tensor([e["index"] for e in examples], dtype=torch.long)}
        tensor_keys = {"prompt_ids", "chosen_ids", "rejected_ids", "input_ids", "index", "label"}
        for key in examples[0]:
            if key not in tensor_keys:
                batch[key] = [e.get(key) for e in examples]
        getattr(self, f"_{self.mode}")(examples, batch)
        return batch

    def _preference(self, examples: list[dict], batch: dict) -> None:
        sides = {}
        for side in ("chosen", "rejected"):
            sides[side] = [e["prompt_ids"] + e[f"{side}_ids"] for e in examples]
        length = self._length([len(s) for seqs in sides.values() for s in seqs])
        for side, seqs in sides.items():
            batch[f"{side}_input_ids"] = _pad(seqs, self.pad_token_id, length)
            batch[f"{side}_attention_mask"] = _pad([[1] * len(s) for s in seqs], 0, length)
            completion = [[0] * len(e["prompt_ids"]) + [1] * len(e[f"{side}_ids"]) for e in examples]
            batch[f"{side}_completion_mask"] = _pad(completion, 0, length)

    def _prompts(self, examples: list[dict], batch: dict) -> None:
        seqs = [e["prompt_ids"] for e in examples]
        length = self._length([len(s) for s in seqs])
        batch["prompt_input_ids"] = _pad(seqs, self.pad_token_id, length, left=True)
        batch["prompt_attention_mask"] = _pad([[1] * len(s) for s in seqs], 0, length, left=True)

    def _labeled(self, examples: list[dict], batch: dict) -> None:
        seqs = [e["input_ids"] for e in examples]
        length = self._length([len(s) for s in seqs])
        batch["input_ids"] = _pad(seqs, self.pad_token_id, length)
        batch["attention_mask"] = _pad([[1] * len(s) for s in seqs], 0, length)
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.float)
        batch["text"] = [
            (e["prompt"][-1]["content"] + "\n" if e.get("prompt") else "") + e["response"] for e in examples
        ]
