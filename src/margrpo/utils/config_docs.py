"""Render a config dataclass tree as markdown (each option's help, type, default and checks), so a configuration's
documentation cannot drift from its code: `python -m margrpo.rl.config` writes docs/configuration.md with it, and a
test compares the two."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from margrpo.utils.config import _hints  # the resolved annotations the loader itself checks against


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return "null" if value is None else f"`{value!r}`".replace("'", "")


def _valid(f: dataclasses.Field) -> str:
    if "choices" in f.metadata:
        return ", ".join(f"`{c}`" for c in f.metadata["choices"])
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        if lo is not None and hi is not None:
            return f"[{lo}, {hi}]"
        return f">= {lo}" if lo is not None else f"<= {hi}"
    return ""


def render(cls: type, prefix: str = "") -> str:
    """Markdown for `cls` and, after it, each of its section dataclasses."""
    hints = _hints(cls)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    title = f"`{prefix.rstrip('.')}`" if prefix else cls.__name__
    lines = [f"## {title}", "", doc, "", "| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
    sections = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections.append((f.name, tp))
        lines.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | {_default(f)} | {_valid(f)} | "
                     f"{f.metadata.get('help', '')} |")
    out = "\n".join(lines) + "\n"
    for name, tp in sections:
        out += "\n" + render(tp, f"{prefix}{name}.")
    return out
