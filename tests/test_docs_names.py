"""Every lit_align name the docs mention exists, so renaming or removing code without its docs
fails here: dotted names (`lit_align.x.Y`, `lit_align.rewards:refusal_reward`), repository paths
(`lit_align/…`, `tests/…`, `configs/…`), class names in backticks, `lit-align` subcommands,
`model.` / `data.` / `trainer.` options, and test references (`test_x.py::test_y`)."""

from __future__ import annotations

import builtins
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

TICKED = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"(?<![\w/.])lit_align(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?")
PATH = re.compile(r"(?<![\w/.~-])(?:lit_align|tests|configs|bench|scripts)/[\w/.*{},-]*\w\}?")
# a whole ticked CamelCase word of two parts or more: `LeanGenerator`, `FSDP2Strategy`, `ValueError`
CLASS_LIKE = re.compile(r"[A-Z](?=[A-Za-z0-9]*[a-z])(?=[A-Za-z0-9]*[A-Z])[A-Za-z0-9]+")
OPTION = re.compile(r"(?<![\w.-])(model|data|trainer)\.(?:init_args\.)?([a-z_]\w*)((?:\.[a-z_]\w*)*)(?![\w(])")
TEST_REF = re.compile(r"(?<![\w/])(?:tests/)?(test_\w+\.py)(?:::(\w+))?")
SUBCOMMAND = re.compile(r"lit-align ([a-z][a-z-]*)")

# Names of other projects' classes the docs mention, found in these modules
EXTERNAL_MODULES = [
    "torch", "torch.nn", "torch.utils.data", "torch.distributed.fsdp", "pickle",
    "lightning.pytorch", "lightning.pytorch.loggers", "lightning.pytorch.strategies", "lightning.pytorch.callbacks",
    "transformers", "transformers.models.llama.modeling_llama", "peft", "trl", "trl.trainer.dpo_trainer",
    "torch.utils.flop_counter", "torchmetrics", "torchmetrics.wrappers",
]
# Columns and classes of the evaluation data sets (HarmBench, JailbreakBench), not Python names
DATA_SET_NAMES = {"SemanticCategory", "FunctionalCategory", "ContextString", "StringClassifier"}
# Deliberately wrong keys in the bad-input table (docs/reliability.md)
KNOWN_TYPOS = {"model.init_args.betta", "trainer.max_stepz"}
# Files a doc names in order to say they are gone
REMOVED = {("demo.md", "lit_align/demo/harmless_prompts.txt")}


def mentions(pattern: re.Pattern, ticked_only: bool = False, whole: bool = False) -> list[tuple[str, str]]:
    """(doc name, match) for every match of `pattern` in the docs (inside backticks if asked; a
    whole ticked chunk if `whole`)."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for chunk in TICKED.findall(text) if ticked_only or whole else [text]:
            if whole:
                found += [(doc.name, chunk)] if pattern.fullmatch(chunk) else []
            else:
                found += [(doc.name, m.group(0).rstrip(".")) for m in pattern.finditer(chunk)]
    return sorted(set(found))


def expand_braces(path: str) -> list[str]:
    """`a_{x,y}.md` -> [`a_x.md`, `a_y.md`]."""
    braces = re.search(r"\{([^{}]*)\}", path)
    if braces is None:
        return [path]
    return [p for alt in braces.group(1).split(",") for p in expand_braces(path[: braces.start()] + alt + path[braces.end() :])]


def resolves(dotted: str) -> bool:
    """`lit_align.a.b.C` (or `lit_align.a.b:C`): the longest importable module prefix, then attributes."""
    parts = dotted.replace(":", ".").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_dotted_names_resolve():
    missing = [(doc, name) for doc, name in mentions(DOTTED) if not resolves(name)]
    assert not missing, f"docs name lit_align objects that do not exist: {missing}"


def test_repository_paths_exist():
    missing = [(doc, path) for doc, mention in mentions(PATH) for path in expand_braces(mention)
               if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()) and (doc, path) not in REMOVED]
    assert not missing, f"docs name files that do not exist: {missing}"


def test_class_names_exist():
    source = "\n".join(p.read_text() for p in (ROOT / "lit_align").rglob("*.py"))
    source += "\n".join(doc.read_text() for doc in DOCS)  # example subclasses the docs define
    defined = set(re.findall(r"^\s*class (\w+)", source, re.M)) | set(re.findall(r"^(\w+)\s*[:=]", source, re.M))
    external = set(dir(builtins)) | DATA_SET_NAMES
    for name in EXTERNAL_MODULES:
        try:
            external |= set(dir(importlib.import_module(name)))
        except ImportError:
            pass
    missing = [(doc, name) for doc, name in mentions(CLASS_LIKE, whole=True)
               if name not in defined and name not in external]
    assert not missing, f"docs name classes that neither lit_align nor its dependencies define: {missing}"


def test_subcommands_exist():
    from lit_align.cli import COMMANDS, TRAINER_SUBCOMMANDS

    known = set(COMMANDS) | set(TRAINER_SUBCOMMANDS)
    missing = [(doc, name) for doc, name in mentions(SUBCOMMAND) if SUBCOMMAND.fullmatch(name).group(1) not in known]
    assert not missing, f"docs name lit-align subcommands that do not exist: {missing}"


def option_names() -> dict[str, set[str]]:
    """What `model.X`, `data.X` and `trainer.X` may name: arguments (and methods) of the classes."""
    import lightning as L

    import lit_align
    from lit_align.data.datamodule import AlignDataModule
    from lit_align.modules.probe import ProbeModule

    def names(cls) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) | {n for n in dir(cls) if not n.startswith("_")}

    modules = [lit_align.DPOModule, lit_align.OnlineDPOModule, lit_align.GRPOModule, lit_align.RewardModule, ProbeModule]
    model = set().union(*map(names, modules)) | {"class_path", "init_args", "help"}
    return {"model": model, "data": names(AlignDataModule), "trainer": names(L.Trainer)}


def dataclass_options() -> dict[str, set[str]]:
    """`model.X.Y`: the fields Y of every module option X typed as a dataclass (`policy`, `backbone`:
    PolicyConfig; GRPO's `sampling`, `loss`, `updates`; OnlineDPO's `sampling`)."""
    import dataclasses
    import typing

    import lit_align
    from lit_align.modules.probe import ProbeModule

    found: dict[str, set[str]] = {}
    for cls in [lit_align.DPOModule, lit_align.OnlineDPOModule, lit_align.GRPOModule, lit_align.RewardModule, ProbeModule]:
        for name, hint in typing.get_type_hints(cls.__init__).items():
            for t in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(t):
                    found.setdefault(name, set()).update(f.name for f in dataclasses.fields(t))
    return found


def test_options_exist():
    allowed, nested_fields = option_names(), dataclass_options()
    assert {"policy", "backbone", "sampling", "loss", "updates"} <= set(nested_fields)
    missing = []
    for doc, option in mentions(OPTION, ticked_only=True):
        group, name, nested = OPTION.fullmatch(option).groups()
        if option in KNOWN_TYPOS:
            continue
        if name not in allowed[group]:
            missing.append((doc, option))
        elif group == "model" and nested and name in nested_fields and nested.split(".")[1] not in nested_fields[name]:
            missing.append((doc, option))
    assert not missing, f"docs name options no module, AlignDataModule or Trainer has: {missing}"


def test_test_references_exist():
    missing = []
    for doc, ref in mentions(TEST_REF):
        file, name = TEST_REF.fullmatch(ref).groups()
        path = ROOT / "tests" / file
        if not path.exists() or (name and not re.search(rf"^\s*(?:async )?def {name}\b", path.read_text(), re.M)):
            missing.append((doc, ref))
    assert not missing, f"docs name tests that do not exist: {missing}"


@pytest.mark.parametrize("name", ["lit_align.NoSuchThing", "lit_align.models.PolicyConfig.nope", "lit_align.rewards:nope"])
def test_a_missing_name_is_caught(name):
    assert not resolves(name)
