"""Loaders for the prompt files users of the neighbouring systems train on, read as published.

Formats (`format=`):

- "geneval": Flow-GRPO / GenEval metadata, JSON Lines with `prompt`, `tag` (one of GENEVAL_TAGS),
  `include` (list of {class, count, color?, position?: [relation, index]}) and optional `exclude`
  (list of {class, count}). Category = tag.
- "t2i_r1": T2I-R1 / MAR-GRPO training mix, JSON Lines with `prompt`, `task_type`, `nouns` and at most
  one of `spatial_info` {obj1, obj2, locality}, `attr_nouns` [str], `numeracy_info` [{obj_name, num}].
  Category = task_type (any non-empty string: the mix has spatial, numeracy, color, shape, texture,
  object, complex, non).
- "jsonl": any JSON Lines with a `prompt` string; category = the `category` string if present, else
  "jsonl".
- "text": one prompt per line; blank lines and lines starting with `#` are skipped; category "text".
- "auto" (default): from the first non-blank line: a JSON object with `tag` is geneval, with
  `task_type` t2i_r1, with `prompt` jsonl; anything not starting with `{` is text.

Records are validated as they are read, so that a broken file fails at load time, not mid-training:
the error names the file, the line, the key or value at fault and what would be valid. Every key of
a record except `prompt` is kept in `metadata`, untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "GENEVAL_TAGS", "PromptFileError", "PromptRecord", "detect_format", "load_prompt_file"]

FORMATS: tuple[str, ...] = ("auto", "geneval", "t2i_r1", "jsonl", "text")
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
GENEVAL_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as the requested format; the message names file and line."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with its category, its record's other fields, and where it came from ("file:line")."""

    prompt: str
    category: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""


class _Line:
    """Location of one record, for error messages."""

    def __init__(self, path: Path, lineno: int) -> None:
        self.path, self.lineno = path, lineno

    @property
    def source(self) -> str:
        return f"{self.path}:{self.lineno}"

    def error(self, message: str) -> PromptFileError:
        return PromptFileError(f"{self.source}: {message}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_str(
    rec: dict[str, Any], key: str, where: _Line, what: str = "record", empty_ok: bool = False
) -> str:
    if key not in rec:
        raise where.error(f"{what} lacks key {key!r} (keys present: {', '.join(map(repr, rec)) or 'none'})")
    value = rec[key]
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise where.error(
            f"{what} key {key!r} must be a non-empty string, got {value!r} ({_type_name(value)})"
        )
    return value


def _require_count(item: dict[str, Any], key: str, where: _Line, what: str, minimum: int) -> None:
    if key not in item:
        raise where.error(f"{what} lacks key {key!r} (keys present: {', '.join(map(repr, item))})")
    value = item[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise where.error(
            f"{what} key {key!r} must be an integer >= {minimum}, got {value!r} ({_type_name(value)})"
        )


def _require_list(rec: dict[str, Any], key: str, where: _Line, required: bool = True) -> list[Any] | None:
    if key not in rec:
        if required:
            raise where.error(f"record lacks key {key!r} (keys present: {', '.join(map(repr, rec))})")
        return None
    value = rec[key]
    if not isinstance(value, list):
        raise where.error(f"key {key!r} must be a list, got {value!r} ({_type_name(value)})")
    return value


# ---------------------------------------------------------------------------------------------------
# Per-format validation: each returns the record's category.


def _check_geneval(rec: dict[str, Any], where: _Line) -> str:
    tag = _require_str(rec, "tag", where)
    if tag not in GENEVAL_TAGS:
        raise where.error(f"unknown tag {tag!r}; valid tags: {', '.join(GENEVAL_TAGS)}")
    include = _require_list(rec, "include", where)
    assert include is not None
    if not include:
        raise where.error("key 'include' must list at least one object")
    for i, item in enumerate(include):
        what = f"include[{i}]"
        if not isinstance(item, dict):
            raise where.error(f"{what} must be an object {{class, count, ...}}, got {item!r}")
        _require_str(item, "class", where, what)
        _require_count(item, "count", where, what, minimum=1)
        if "color" in item:
            _require_str(item, "color", where, what)
        if "position" in item:
            pos = item["position"]
            ok = (
                isinstance(pos, list)
                and len(pos) == 2
                and pos[0] in GENEVAL_RELATIONS
                and isinstance(pos[1], int)
                and not isinstance(pos[1], bool)
                and 0 <= pos[1] < len(include)
                and pos[1] != i
            )
            if not ok:
                raise where.error(
                    f"{what} key 'position' must be [relation, index of another include item] with relation "
                    f"one of {', '.join(GENEVAL_RELATIONS)} and index in 0..{len(include) - 1}, got {pos!r}"
                )
    for i, item in enumerate(_require_list(rec, "exclude", where, required=False) or []):
        what = f"exclude[{i}]"
        if not isinstance(item, dict):
            raise where.error(f"{what} must be an object {{class, count}}, got {item!r}")
        _require_str(item, "class", where, what)
        _require_count(item, "count", where, what, minimum=1)
    return tag


def _check_t2i_r1(rec: dict[str, Any], where: _Line) -> str:
    task_type = _require_str(rec, "task_type", where)
    nouns = _require_list(rec, "nouns", where)
    assert nouns is not None
    for i, n in enumerate(nouns):
        if not isinstance(n, str):
            raise where.error(f"nouns[{i}] must be a string, got {n!r} ({_type_name(n)})")
    if "spatial_info" in rec:
        info = rec["spatial_info"]
        if not isinstance(info, dict):
            raise where.error(f"key 'spatial_info' must be an object {{obj1, obj2, locality}}, got {info!r}")
        for key in ("obj1", "obj2", "locality"):
            _require_str(info, key, where, "spatial_info")
    for i, a in enumerate(_require_list(rec, "attr_nouns", where, required=False) or []):
        if not isinstance(a, str):
            raise where.error(f"attr_nouns[{i}] must be a string, got {a!r} ({_type_name(a)})")
    for i, item in enumerate(_require_list(rec, "numeracy_info", where, required=False) or []):
        what = f"numeracy_info[{i}]"
        if not isinstance(item, dict):
            raise where.error(f"{what} must be an object {{obj_name, num}}, got {item!r}")
        _require_str(item, "obj_name", where, what)
        _require_count(item, "num", where, what, minimum=0)
    return task_type


def _check_jsonl(rec: dict[str, Any], where: _Line) -> str:
    cat = rec.get("category", "jsonl")
    if not isinstance(cat, str):
        raise where.error(f"key 'category' must be a string, got {cat!r} ({_type_name(cat)})")
    return cat


_CHECKS = {"geneval": _check_geneval, "t2i_r1": _check_t2i_r1, "jsonl": _check_jsonl}


# ---------------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc}); prompt files must be UTF-8") from None


def _format_of(first: str, where: _Line) -> str:
    if first.startswith("["):
        raise where.error(
            "looks like a JSON array; expected JSON Lines (one JSON object per line) or plain text"
        )
    if not first.startswith("{"):
        return "text"
    rec = _parse_json(first, where)
    if "tag" in rec:
        return "geneval"
    if "task_type" in rec:
        return "t2i_r1"
    if "prompt" in rec:
        return "jsonl"
    raise where.error(
        f"cannot tell the format from keys {sorted(rec)}: expected 'prompt' with 'tag' (geneval), "
        "'task_type' (t2i_r1) or alone (jsonl)"
    )


def _parse_json(line: str, where: _Line) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise where.error(
            f"malformed JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
        ) from None
    if not isinstance(rec, dict):
        raise where.error(f"expected a JSON object, got {_type_name(rec)}")
    return rec


def _first_content(lines: list[str]) -> tuple[int, str] | None:
    for i, line in enumerate(lines, start=1):
        s = line.strip()
        if s and not s.startswith("#"):
            return i, s
    return None


def detect_format(path: str | Path) -> str:
    """The format `load_prompt_file(path, "auto")` would use (rules in the module docstring)."""
    path = Path(path)
    first = _first_content(_read_lines(path))
    return "text" if first is None else _format_of(first[1], _Line(path, first[0]))


def load_prompt_file(path: str | Path, format: str = "auto") -> list[PromptRecord]:
    """Read every prompt of a file as PromptRecords, validating each record (see module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"unknown prompt-file format {format!r}; valid: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = _read_lines(path)
    if format == "auto":
        first = _first_content(lines)
        format = "text" if first is None else _format_of(first[1], _Line(path, first[0]))
    records: list[PromptRecord] = []
    if format == "text":
        for lineno, line in enumerate(lines, start=1):
            s = line.strip()
            if s and not s.startswith("#"):
                records.append(PromptRecord(s, "text", {}, f"{path}:{lineno}"))
        return records
    check = _CHECKS[format]
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = _Line(path, lineno)
        rec = _parse_json(line, where)
        prompt = _require_str(rec, "prompt", where)
        category = check(rec, where)
        metadata = {k: v for k, v in rec.items() if k != "prompt"}
        records.append(PromptRecord(prompt, category, metadata, where.source))
    return records
