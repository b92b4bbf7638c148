"""Turning chat messages and responses into token ids, one way for every module.

A prompt is a list of chat messages (`[{"role": "user", "content": ...}, ...]`); the model's
chat template renders it with the generation prompt, and a response is appended followed by
the EOS token, so that a probe, a reward model and the DPO policy all see the same text.
"""

from __future__ import annotations

Messages = list[dict]


def as_messages(prompt: str | Messages) -> Messages:
    """A bare string becomes a single user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def render_prompt(tokenizer, prompt: str | Messages) -> str:
    """The prompt as text, ending with the assistant header the model continues from."""
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: "
            "set one (tokenizer.chat_template) or use a chat model"
        )
    return tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, prompt: str | Messages) -> list[int]:
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Response tokens followed by EOS (the end of the assistant turn)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def encode_pair(tokenizer, prompt: str | Messages, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS)."""
    return encode_prompt(tokenizer, prompt), encode_response(tokenizer, response)
