"""Shared fixtures: the tiny model directory and the path to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared_data() -> Path:
    """../shared/data, or skip (fail when LIT_ALIGN_REQUIRE_DATA=1)."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    message = f"real data not found at {SHARED_DATA} (the project's ../shared/data)"
    if os.environ.get("LIT_ALIGN_REQUIRE_DATA") == "1":
        pytest.fail(message + " and LIT_ALIGN_REQUIRE_DATA=1")
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


def pinned_trl_version() -> str:
    """The TRL version the dev extra pins (pyproject.toml): the one the parity tests run against."""
    import re

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    return re.search(r'"trl==([^"]+)"', pyproject).group(1)


@pytest.fixture(scope="session")
def trl():
    """The `trl` module at the pinned version, or skip (fail when LIT_ALIGN_REQUIRE_DATA=1): the
    parity tests call some of its private methods, which change between versions."""
    import importlib.metadata

    pinned = pinned_trl_version()
    try:
        installed = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != pinned:
        message = f"the TRL parity tests need trl=={pinned} (pip install -e '.[dev]'); found {installed or 'none'}"
        if os.environ.get("LIT_ALIGN_REQUIRE_DATA") == "1":
            pytest.fail(message + " and LIT_ALIGN_REQUIRE_DATA=1")
        pytest.skip(message)
    import trl

    return trl


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer with a chat template, saved as an HF directory."""
    from lit_align.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    """The tiny model (eval mode) and its tokenizer, loaded once per test module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
