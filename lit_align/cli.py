"""The `lit-align` command.

`lit-align fit|validate|test|predict -c configs/X.yaml` runs LightningCLI: `model.class_path`
chooses the module (DPOModule, ProbeModule, RewardModule, GRPOModule) and `data` configures the
shared AlignDataModule. Every other subcommand is a plain function in `COMMANDS`, parsed by
jsonargparse from its signature and docstring (`lit-align build-cod --help`).
"""

from __future__ import annotations

import importlib
import sys

# name -> "module:function". Each function's signature is its CLI.
COMMANDS: dict[str, str] = {
    # -- registry: one line per subcommand --
    "demo": "lit_align.demo.pipeline:demo",
    "rerank-candidates": "lit_align.probes.candidates:rerank_candidates",
    "export": "lit_align.export:export",
    "evaluate": "lit_align.eval.evaluate:evaluate",
    "ablate": "lit_align.experiments.ablate:ablate",
    "judge-accuracy": "lit_align.eval.judge_accuracy:judge_accuracy",
    "build-cod": "lit_align.srmir.cod:build_cod",
    "train-shadow": "lit_align.srmir.shadow:train_shadow",
    "build-pairs": "lit_align.data.refusal_pairs:build_pairs",
    "filter-prompts": "lit_align.experiments.prepare:filter_prompts",
}

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(args: list[str] | None = None) -> None:
    from jsonargparse import set_parsing_settings

    # dataclass fields' docstrings (PolicyConfig, SamplingConfig, ...) become --help text
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        from jsonargparse import ArgumentParser, auto_cli

        from lit_align.checks import ConfigError
        from lit_align.cli_errors import OneLineErrors, debug, exit_with_one_line

        class Parser(OneLineErrors, ArgumentParser):  # a configuration mistake: one line
            pass

        rest = ["--config" if a == "-c" else a for a in argv[1:]]  # `-c` as for fit/validate/test
        try:
            auto_cli(_load(COMMANDS[argv[0]]), args=rest, as_positional=False, parser_class=Parser)
        except ConfigError as ex:
            if debug():
                raise
            exit_with_one_line(str(ex), ex)
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] in TRAINER_SUBCOMMANDS:
        from lit_align.lightning_cli import run_lightning_cli

        run_lightning_cli(argv if args is not None else None)
        return
    known = ", ".join([*TRAINER_SUBCOMMANDS, *COMMANDS])
    raise SystemExit(f"lit-align: unknown command {argv[0]!r}; choose one of: {known}")


if __name__ == "__main__":
    main()
