"""Reading preference, prompt and labelled data into one row shape, with clear errors.

Sources load through `datasets` (a hub id, or a local json / jsonl / jsonl.gz / csv /
parquet file). A *format* preset says how a source's columns map onto lit_align's rows:

* `generic`:       prompt, chosen, rejected, optional category (labeled: text or prompt + response, label)
* `hh_rlhf`:       Anthropic HH-RLHF transcripts, split at the last "\\n\\nAssistant:"
* `pku_saferlhf`:  prompt, response_0/1, safer_response_id, is_response_{0,1}_safe

(adding one is a preset function and one line in `PRESETS`), and a *mode* says what the module
needs: `preference` pairs, `prompts` (GRPO), or `labeled` texts (probes). Every row is
validated; a bad row raises `BadRowError` naming the file, row and field, or is skipped and
counted when `on_bad_rows="skip"`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, get_args

log = logging.getLogger(__name__)

Mode = Literal["preference", "prompts", "labeled"]
MODES: tuple[str, ...] = get_args(Mode)


class BadRowError(ValueError):
    """A source row that cannot be used, with where it is and what to do."""

    def __init__(self, source: str, row: int, field: str, problem: str):
        self.source, self.row, self.field, self.problem = source, row, field, problem
        super().__init__(
            f"{source}, row {row}, field {field!r}: {problem}. Fix the row, or set "
            f"data.on_bad_rows=skip to skip such rows (they are counted and logged)."
        )


# ---------------------------------------------------------------------------- loading
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _uncompressed_suffix(path: str) -> str:
    name = path.lower()
    for compressed in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(compressed):
            name = name[: -len(compressed)]
    return Path(name).suffix


def _builder(path: str) -> Optional[str]:
    return _BUILDERS.get(_uncompressed_suffix(path))


def load_source(path: str, split: str = "train", name: Optional[str] = None):
    """A `datasets.Dataset` from a local file (by extension) or a hub id."""
    import datasets

    builder = _builder(path)
    if builder is not None:
        if not Path(path).exists():
            raise FileNotFoundError(f"data file not found: {path}")
        try:
            return datasets.load_dataset(builder, data_files=path, split="train")
        except Exception as err:  # datasets wraps parse errors in several types
            problem = diagnose_file(path, builder) or str(err)
            raise ValueError(f"could not read {path} as {builder}: {problem}") from err
    if Path(path).exists():
        raise ValueError(f"{path}: unknown file type; use .json, .jsonl(.gz), .csv or .parquet")
    return datasets.load_dataset(path, name, split=split)


def _open_bytes(path: str):
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    return openers.get(Path(path).suffix.lower(), open)(path, "rb")


def diagnose_file(path: str, builder: str) -> Optional[str]:
    """After `datasets` failed on a local file: the first concrete problem, with its line."""
    import json

    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError) as err:
        return f"the file is not a valid compressed file ({err}); re-compress it or drop the extension"
    if not data.strip():
        return "the file is empty; it has no rows"
    json_lines = _uncompressed_suffix(path) == ".jsonl"
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"line {number} is not UTF-8 text ({err.reason} at column {err.start + 1}); re-save the file as UTF-8"
        if json_lines and text.strip():
            try:
                json.loads(text)
            except json.JSONDecodeError as err:
                return f"line {number}, column {err.colno}: invalid JSON ({err.msg}); each line must be one JSON object"
    if builder == "json" and not json_lines:
        try:
            json.loads(data)
        except json.JSONDecodeError as err:
            return f"line {err.lineno}, column {err.colno}: invalid JSON ({err.msg})"
    return None


# ---------------------------------------------------------------------------- field checks
def _text(row: dict, field: str, source: str, index: int) -> str:
    if field not in row:
        raise BadRowError(source, index, field, f"missing (columns: {sorted(row)})")
    value = row[field]
    if value is None:  # `datasets` turns a key absent from some JSON lines into None
        raise BadRowError(source, index, field, f"is None (missing or null; columns: {sorted(row)})")
    if not isinstance(value, str):
        raise BadRowError(source, index, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRowError(source, index, field, "is empty")
    return value


def _prompt(row: dict, field: str, source: str, index: int) -> list[dict]:
    """A prompt column holding a string or a list of chat messages."""
    value = row.get(field)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for m in value:
            if not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
                raise BadRowError(source, index, field, "messages need a role and string content")
        if not any(m["role"] == "user" for m in value):
            roles = [m["role"] for m in value]
            raise BadRowError(source, index, field, f"the prompt has no user turn (roles: {roles}); add the user's message")
        return value
    return [{"role": "user", "content": _text(row, field, source, index)}]


def _category(row: dict) -> Optional[str]:
    value = row.get("category")
    return str(value) if value not in (None, "") else None


def _label(row: dict, field: str, source: str, index: int) -> float:
    value = row.get(field)
    if isinstance(value, str) and value.strip().lower() in ("safe", "unsafe", "1", "0", "true", "false"):
        return 1.0 if value.strip().lower() in ("safe", "1", "true") else 0.0
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return float(value)
    raise BadRowError(source, index, field, f"expected a safe/unsafe label (1/0, true/false, safe/unsafe), got {value!r}")


def _pair(prompt, chosen: str, rejected: str, category, source: str, index: int) -> dict:
    if chosen.strip() == rejected.strip():
        raise BadRowError(source, index, "rejected", "identical to chosen; a preference pair needs two different responses")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "category": category}


# ---------------------------------------------------------------------------- presets
_TURN = re.compile(r"\n\nHuman: |\n\nAssistant: ")


def split_hh_transcript(text: str) -> tuple[list[dict], str]:
    """HH-RLHF transcript -> (chat messages up to the last assistant turn, last response)."""
    cut = text.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    history, response = text[:cut], text[cut + len("\n\nAssistant:") :].strip()
    messages = []
    for marker, content in zip(_TURN.findall(history + " "), _TURN.split(history + " ")[1:]):
        role = "user" if "Human" in marker else "assistant"
        messages.append({"role": role, "content": content.strip()})
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the transcript does not end with a human turn before the last assistant turn")
    return messages, response


def _hh_rlhf(row: dict, mode: str, source: str, index: int) -> list[dict]:
    chosen_text = _text(row, "chosen", source, index)
    rejected_text = _text(row, "rejected", source, index)
    try:
        prompt, chosen = split_hh_transcript(chosen_text)
        prompt_r, rejected = split_hh_transcript(rejected_text)
    except ValueError as err:
        raise BadRowError(source, index, "chosen", f"not an HH-RLHF transcript ({err})") from None
    if prompt != prompt_r:
        raise BadRowError(source, index, "rejected", "its conversation before the last turn differs from chosen's")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise BadRowError(source, index, field, "the last assistant turn is empty")
    if mode == "prompts":
        return [{"prompt": prompt, "category": None}]
    if mode == "labeled":  # HH-RLHF's harmless split: chosen is the less harmful reply
        return [
            {"prompt": prompt, "response": chosen, "label": 1.0, "category": None},
            {"prompt": prompt, "response": rejected, "label": 0.0, "category": None},
        ]
    return [_pair(prompt, chosen, rejected, None, source, index)]


def _pku_category(row: dict, response_id: int) -> Optional[str]:
    harms = row.get(f"response_{response_id}_harm_category") or {}
    hits = [name for name, on in harms.items() if on] if isinstance(harms, dict) else []
    return hits[0] if hits else None


def _pku_saferlhf(row: dict, mode: str, source: str, index: int) -> list[dict]:
    prompt = _prompt(row, "prompt", source, index)
    if mode == "prompts":
        return [{"prompt": prompt, "category": _pku_category(row, 0) or _pku_category(row, 1)}]
    responses = [_text(row, "response_0", source, index), _text(row, "response_1", source, index)]
    if mode == "labeled":
        out = []
        for i in (0, 1):
            label = _label(row, f"is_response_{i}_safe", source, index)
            out.append({"prompt": prompt, "response": responses[i], "label": label, "category": _pku_category(row, i)})
        return out
    safer = row.get("safer_response_id")
    if safer not in (0, 1):
        raise BadRowError(source, index, "safer_response_id", f"expected 0 or 1, got {safer!r}")
    category = _pku_category(row, 1 - safer) or _pku_category(row, safer)
    return [_pair(prompt, responses[safer], responses[1 - safer], category, source, index)]


def _generic(row: dict, mode: str, source: str, index: int) -> list[dict]:
    category = _category(row)
    if mode == "labeled":
        if "text" in row and "prompt" not in row:
            prompt, response = None, _text(row, "text", source, index)
        else:
            prompt, response = _prompt(row, "prompt", source, index), _text(row, "response", source, index)
        return [{"prompt": prompt, "response": response, "label": _label(row, "label", source, index), "category": category}]
    prompt = _prompt(row, "prompt", source, index)
    if mode == "prompts":
        extra = {k: v for k, v in row.items() if k not in ("prompt", "category")}
        return [{"prompt": prompt, "category": category, **extra}]
    chosen = _text(row, "chosen", source, index)
    rejected = _text(row, "rejected", source, index)
    return [_pair(prompt, chosen, rejected, category, source, index)]


# format name -> preset(row, mode, source, index) -> rows in lit_align's shape (raises BadRowError)
PRESETS: dict[str, Callable[[dict, str, str, int], list[dict]]] = {
    # -- registry: one line per format --
    "generic": _generic,
    "hh_rlhf": _hh_rlhf,
    "pku_saferlhf": _pku_saferlhf,
}
FORMATS: tuple[str, ...] = tuple(PRESETS)
Format = Literal[FORMATS]  # the registry's names (so `--help` lists them)


def _rows_checking_encoding(rows: Iterable[dict], source: str) -> Iterable[dict]:
    """`rows`, turning a text-decoding failure (pyarrow reads bytes lazily) into a clear error."""
    iterator, index = iter(rows), 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{source}, row {index}: text is not UTF-8 ({err.reason}, byte {err.object[err.start:err.start + 1]!r}); "
                "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        yield row
        index += 1


def _check_unique_id(row: dict, seen: dict, source: str, index: int) -> None:
    """Rows that carry an `id` must not repeat one (a duplicated row is usually a merge mistake)."""
    if "id" not in row or row["id"] is None:
        return
    key = str(row["id"])
    if key in seen:
        raise BadRowError(source, index, "id", f"duplicate id {row['id']!r} (first seen in row {seen[key]})")
    seen[key] = index


def normalize_rows(
    rows: Iterable[dict[str, Any]],
    format: str = "generic",
    mode: str = "preference",
    on_bad_rows: str = "error",
    source: str = "<rows>",
) -> tuple[list[dict], int]:
    """Rows in lit_align's shape for `mode`, and how many bad rows were skipped."""
    if format not in PRESETS:
        raise ValueError(f"data.format={format!r}: choose one of {FORMATS}")
    if mode not in MODES:
        raise ValueError(f"data.mode={mode!r}: choose one of {MODES}")
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"data.on_bad_rows={on_bad_rows!r}: choose 'error' or 'skip'")
    preset, out, skipped, seen_ids = PRESETS[format], [], 0, {}
    for index, row in enumerate(_rows_checking_encoding(rows, source)):
        try:
            _check_unique_id(row, seen_ids, source, index)
            out.extend(preset(row, mode, source, index))
        except BadRowError as err:
            if on_bad_rows == "error":
                raise
            skipped += 1
            log.debug("skipped: %s", err)
    if skipped:
        log.warning("%s: skipped %d bad rows (on_bad_rows=skip)", source, skipped)
    return out, skipped


def load_rows(
    path: str, format: str = "generic", mode: str = "preference", on_bad_rows: str = "error", split: str = "train"
) -> list[dict]:
    """Read `path` and return its normalised rows (see the module docstring)."""
    rows, _ = normalize_rows(load_source(path, split), format, mode, on_bad_rows, source=path)
    if not rows:
        raise ValueError(f"{path}: no usable rows (format={format}, mode={mode})")
    return rows
