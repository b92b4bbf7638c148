"""A deterministic tiny causal LM and tokenizer, built in-process and saved to disk.

Tests (and users trying configs) go through the very `from_pretrained` path real models take:
`make_tiny_model(dir)` trains a byte-level BPE tokenizer with a ChatML chat template, builds a
small random Llama from a config with a fixed seed and saves both as a Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# HH-RLHF-style prompts of different lengths (so batches are left-padded), for decoding tests
HH_PROMPTS = [
    "Human: How do I keep my sourdough starter alive while I am away for two weeks?\n\nAssistant:",
    "Human: hi\n\nAssistant:",
    "Human: Write a short poem about rain on a tin roof.\n\nAssistant:",
]

_CORPUS = [
    "How do I bake bread at home? Mix flour, water, yeast and salt, then knead and bake.",
    "I cannot help with that request because it could cause harm to people.",
    "Sorry, I can't assist with making weapons or anything dangerous.",
    "Here is a step by step guide: first gather the materials, then follow the instructions.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Human: tell me a joke. Assistant: Why did the chicken cross the road?",
    "Think step by step, but only keep a minimum draft for each thinking step. ####",
    "Write a poem about the sea, the wind and the stars above the quiet harbour.",
    "Steal, hack, attack, kill, poison, fraud, insult, privacy, discrimination, illegal.",
    "Please explain how photosynthesis works in plants and why leaves are green.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
]


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer with ChatML special tokens; save and reload it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def make_tiny_model(
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    vocab_size: int = 512,
) -> Path:
    """Save a tiny random Llama plus its tokenizer to `out_dir` and return the path."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out_dir, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


def teach_canned_responses(model_dir: str | Path, out_dir: str | Path, examples: list[tuple], steps: int = 60) -> Path:
    """Copy the tiny model in `model_dir` to `out_dir`, fine-tuned to answer each `(prompt,
    response)` of `examples` (prompts as strings or chat messages) with its response: a generator
    whose output is known, for tests of pipelines that parse what a model writes (e.g.
    Chain-of-Draft refusals)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_align.data.render import encode_pair

    out_dir = Path(out_dir)
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    pairs = [encode_pair(tok, prompt, response) for prompt, response in examples]
    width = max(len(a) + len(b) for a, b in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (a, b) in enumerate(pairs):
        ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)
        mask[i, : len(a) + len(b)] = 1
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    return out_dir
