"""Typed configuration: (nested) dataclasses loaded from YAML files plus dotted overrides.

Why this and not a bare ``yaml.safe_load``: a typo in a config key (``lr_warmpu``) or a value of
the wrong kind (``lr: 1e-3`` read by PyYAML as the *string* "1e-3") would otherwise run for hours
with a silent default. Every value is therefore checked against the dataclass that declares it,
and every error names where the value came from (file and line, or the command-line override),
the dotted key, the value and what would be valid.

Sources of values, later ones win:

1. the dataclass defaults;
2. the YAML file, after the files it names with a top-level ``base: other.yaml`` key (relative to
   the file; may also be a list; applied first, recursively; cycles are errors);
3. the overrides, in order: ``train.lr=3e-4``, ``model.depth=4``, ``name=null``,
   ``rewards={shapes: 1.0, jpeg_compressibility: 0.1}``. Values are parsed as YAML.

Merging rule: a mapping given for a *dataclass-typed* field is merged into that section key by
key; any other value, including a mapping for a ``dict[str, float]`` field, replaces the old value
as a whole (so ``rewards={a: 1.0}`` means exactly those rewards).

Field checks come from the annotation and from ``dataclasses.field(metadata=...)``:

- ``{"range": (lo, hi)}``: inclusive bounds, either may be ``None``; applies to numbers and to the
  numbers inside lists, tuples and dict values of the field;
- ``{"choices": (...)}``: the value (or each element) must be one of these; ``Literal[...]``
  annotations are checked the same way;
- ``{"allow_nonfinite": True}``: accept nan/inf (rejected by default).

Supported annotations: nested dataclasses, ``Optional[...]``/``X | None``, other unions (first
match wins), ``list[...]``, ``tuple[...]`` (fixed or ``X, ...``), ``dict[K, V]``, ``Literal``,
``bool``, ``int`` (a float is an error), ``float`` (an int is accepted), ``str``, ``pathlib.Path``,
``enum.Enum`` subclasses, ``Any``. The key ``base`` is reserved at the top level of YAML files.

YAML parsing uses a ``SafeLoader`` subclass that also reads ``3e-4`` and ``1e5`` as floats (YAML 1.1
needs a dot); ``save_config`` writes with the matching dumper so strings such as ``"1e5"`` stay
quoted and the file round-trips exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from margrpo.utils.atomic import atomic_write_text

__all__ = [
    "ConfigError",
    "option",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "save_config",
    "BASE_KEY",
]

T = TypeVar("T")

BASE_KEY = "base"


class ConfigError(ValueError):
    """One or more configuration problems. ``errors`` holds one message per problem."""

    def __init__(self, errors: str | Sequence[str]):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            msg = self.errors[0]
        else:
            msg = f"{len(self.errors)} configuration errors:\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(msg)


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           **checks: Any) -> Any:
    """A dataclass field declared once with its meaning: `help` (for docs/configuration.md) and its checks
    (`range=(lo, hi)`, `choices=(...)`, `allow_nonfinite=True`)."""
    if not help:
        raise TypeError("every option needs its help text")
    unknown = set(checks) - {"range", "choices", "allow_nonfinite"}
    if unknown:
        raise TypeError(f"unknown option checks {sorted(unknown)}; valid: range, choices, allow_nonfinite")
    metadata = {"help": help, **checks}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------
# YAML dialect: SafeLoader + floats without a dot (3e-4), and the matching dumper.

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """Safe loader that reads ``1e-3`` as a float, as every user expects."""


class _Dumper(yaml.SafeDumper):
    """Safe dumper that quotes strings the loader would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _parse_yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# --------------------------------------------------------------------------------------------
# Where values came from.


@dataclass(frozen=True)
class _Source:
    kind: str  # "file" | "override" | "default" | "dict"
    where: str
    line: int | None = None
    raw: str | None = None  # override value text, for str fields given e.g. `name=2024`

    def describe(self) -> str:
        if self.kind == "file":
            return f"{self.where}:{self.line}" if self.line else self.where
        if self.kind == "override":
            return f"override '{self.where}'"
        if self.kind == "default":
            return f"default of {self.where}"
        return self.where


_Sources = dict[tuple, _Source]  # key path (str keys, int list indices) -> where it was set


def _fmt(path: tuple) -> str:
    out = ""
    for p in path:
        if isinstance(p, int) and not isinstance(p, bool):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "<root>"


def _source_for(sources: _Sources, path: tuple) -> _Source | None:
    for n in range(len(path), -1, -1):
        s = sources.get(path[:n])
        if s is not None:
            return s
    return None


def _drop_sources(sources: _Sources, prefix: tuple) -> None:
    n = len(prefix)
    for k in [k for k in sources if k[:n] == prefix]:
        del sources[k]


# --------------------------------------------------------------------------------------------
# Type helpers.

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception as e:  # unresolvable forward reference: a bug in the config class
            raise TypeError(f"cannot resolve the field types of {cls.__qualname__}: {e}") from e
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _child_type(tp: Any, key: Any) -> Any:
    """The declared type of ``key`` inside a value of type ``tp`` (None if unknown)."""
    tp = _strip_optional(tp)
    if _is_dataclass_type(tp):
        flds = _init_fields(tp)
        return _hints(tp).get(key) if key in flds else None
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1]
    if origin in (list, Sequence) and args:
        return args[0]
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        if isinstance(key, int) and 0 <= key < len(args):
            return args[key]
    return None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    origin = get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        args = get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{name}[{inner}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    r = repr(value)
    if len(r) > 80:
        r = r[:77] + "..."
    return f"{type(value).__name__} {r}"


# --------------------------------------------------------------------------------------------
# Plain-data conversion (dataclass -> dict).


def _to_plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _to_plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, enum.Enum):
        return _to_plain(v.value)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, Mapping):
        return {_to_plain(k): _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts/lists/scalars (tuples become lists, enums their values, paths str).

    Only ``init`` fields are included, because only those can be loaded back.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, in field order, readable back by :func:`load_config`."""
    return yaml.dump(
        config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config to ``path`` as YAML, atomically (temp file + ``os.replace``).

    ``load_config(type(cfg), path)`` gives back an equal config.
    """
    return atomic_write_text(path, config_to_yaml(cfg))


def _defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in _init_fields(cls).values():
        if f.default is not dataclasses.MISSING:
            out[f.name] = _to_plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _to_plain(f.default_factory())
    return out


# --------------------------------------------------------------------------------------------
# Reading YAML files with line numbers.


def _walk_marks(
    loader: _Loader,
    node: yaml.Node,
    path: tuple,
    file: str,
    sources: _Sources,
    errors: list[str],
    ancestors: frozenset[int] = frozenset(),
) -> None:
    if id(node) in ancestors:  # a recursive alias (`&a [*a]`): nothing more to locate
        return
    ancestors = ancestors | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge" or not isinstance(knode, yaml.ScalarNode):
                continue  # `<<: *anchor` merges: the merged keys inherit the parent's location
            key = loader.construct_object(knode)
            line = knode.start_mark.line + 1
            p = path + (key,)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key; the constructor has already complained
                continue
            if first is not None:
                errors.append(f"{file}:{line}: duplicate key '{_fmt(p)}' (first given at line {first})")
            seen[key] = line
            sources[p] = _Source("file", file, line)
            _walk_marks(loader, vnode, p, file, sources, errors, ancestors)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            p = path + (i,)
            sources[p] = _Source("file", file, item.start_mark.line + 1)
            _walk_marks(loader, item, p, file, sources, errors, ancestors)


def _read_yaml(path: Path) -> tuple[dict[str, Any], _Sources]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    loader = _Loader(text)
    sources: _Sources = {(): _Source("file", str(path), 1)}
    errors: list[str] = []
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        if node is not None:
            _walk_marks(loader, node, (), str(path), sources, errors)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    if errors:
        raise ConfigError(errors)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: the top level of a config file must be a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    return data, sources


def _load_layers(path: Path, stack: tuple[Path, ...]) -> list[tuple[dict[str, Any], _Sources]]:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"{path}: '{BASE_KEY}' files form a cycle: {chain}")
    data, sources = _read_yaml(path)
    layers: list[tuple[dict[str, Any], _Sources]] = []
    if BASE_KEY in data:
        base = data.pop(BASE_KEY)
        where = sources.get((BASE_KEY,), _Source("file", str(path))).describe()
        bases = [base] if isinstance(base, str) else base
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError(
                f"{where}: '{BASE_KEY}' must be a file name or a list of file names, got {_describe(base)}"
            )
        for b in bases:
            bpath = path.parent / b
            if not bpath.is_file():
                raise ConfigError(f"{where}: base config '{b}' not found (looked for {bpath})")
            layers.extend(_load_layers(bpath, (*stack, resolved)))
        _drop_sources(sources, (BASE_KEY,))
    layers.append((data, sources))
    return layers


# --------------------------------------------------------------------------------------------
# Merging layers into the raw tree.


def _merge_into(
    raw: dict[str, Any],
    layer: Mapping[str, Any],
    tp: Any,
    path: tuple,
    sources: _Sources,
    layer_source: Callable[[tuple], _Source | None],
) -> None:
    for key, value in layer.items():
        p = path + (key,)
        ftp = _child_type(tp, key)
        cur = raw.get(key)
        src = layer_source(p)
        if isinstance(value, dict) and isinstance(cur, dict) and _is_dataclass_type(_strip_optional(ftp)):
            if src is not None:
                sources[p] = src
            _merge_into(cur, value, ftp, p, sources, layer_source)
        else:
            raw[key] = copy.deepcopy(value)
            _drop_sources(sources, p)
            if src is not None:
                sources[p] = src
            if isinstance(value, (dict, list)):
                _copy_sub_sources(value, p, sources, layer_source)


def _copy_sub_sources(
    value: Any, path: tuple, sources: _Sources, layer_source: Callable[[tuple], _Source | None]
) -> None:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        p = path + (k,)
        s = layer_source(p)
        if s is not None:
            sources[p] = s
        if isinstance(v, (dict, list)):
            _copy_sub_sources(v, p, sources, layer_source)


def _apply_override(raw: dict[str, Any], text: str, cls: type, sources: _Sources) -> None:
    if not isinstance(text, str):
        raise ConfigError(f"override {text!r}: overrides must be strings like 'train.lr=3e-4'")
    key, sep, val_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected key=value, e.g. 'train.lr=3e-4'")
    parts = key.split(".")
    if any(not p.strip() for p in parts):
        raise ConfigError(f"override '{text}': key '{key}' has an empty component")
    parts = [p.strip() for p in parts]
    if val_text.strip() == "":
        value: Any = ""
    else:
        try:
            value = _parse_yaml_value(val_text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(
                f"override '{text}': cannot parse value {val_text!r} as YAML: {problem}"
            ) from None
    src = _Source("override", text, raw=None if isinstance(value, (dict, list)) else val_text.strip())

    node: Any = raw
    tp: Any = cls
    path: tuple = ()
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override '{text}': '{_fmt(path)}' is a list of {len(node)} items; "
                    f"'{part}' is not a valid index"
                )
            idx: Any = int(part)
            child = node[idx]
        else:
            idx = part
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
                sources[path + (idx,)] = src  # so that "unknown key 'trian'" names this override
        path = path + (idx,)
        if not isinstance(child, (dict, list)):
            raise ConfigError(
                f"override '{text}': cannot set '{key}' because '{_fmt(path)}' holds {_describe(child)}, "
                "not a section"
            )
        tp = _child_type(tp, idx)
        node = child

    last: Any = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(
                f"override '{text}': '{_fmt(path)}' is a list of {len(node)} items; "
                f"'{last}' is not a valid index"
            )
        last = int(last)
        _drop_sources(sources, path + (last,))
        sources[path + (last,)] = src
        node[last] = value
        return

    def layer_source(p: tuple) -> _Source | None:
        return src

    _merge_into(node, {last: value}, tp, path, sources, layer_source)
    if isinstance(value, dict):
        sources[path + (last,)] = src


# --------------------------------------------------------------------------------------------
# Validation and conversion.


class _Invalid:
    pass


_INVALID = _Invalid()


@dataclass
class _Ctx:
    sources: _Sources
    errors: list[str]

    def err(self, path: tuple, msg: str) -> _Invalid:
        src = _source_for(self.sources, path)
        loc = src.describe() if src is not None else "config"
        self.errors.append(f"{loc}: {msg}")
        return _INVALID


def _fmt_range(lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}"


def _check_leaf(value: Any, path: tuple, ctx: _Ctx, meta: Mapping[str, Any]) -> Any:
    key = _fmt(path)
    choices = meta.get("choices")
    if choices is not None and not any(value == c and type(value) is type(c) for c in choices):
        if not (isinstance(value, float) and any(isinstance(c, int) and value == c for c in choices)):
            return ctx.err(path, f"{key} = {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    rng = meta.get("range")
    if rng is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return ctx.err(path, f"{key} = {value!r} is out of range: must be {_fmt_range(lo, hi)}")
    return value


def _convert(value: Any, tp: Any, path: tuple, ctx: _Ctx, meta: Mapping[str, Any]) -> Any:
    key = _fmt(path)

    if tp is Any or tp is object:
        return value

    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            return ctx.err(path, f"{key}: expected {_type_name(tp)}, got None")
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], path, ctx, meta)
        for a in options:
            sub = _Ctx(ctx.sources, [])
            out = _convert(value, a, path, sub, meta)
            if not sub.errors:
                return out
        return ctx.err(path, f"{key}: expected {_type_name(tp)}, got {_describe(value)}")

    origin = get_origin(tp)
    args = get_args(tp)

    if origin is typing.Literal:
        return _check_leaf(value, path, ctx, {**meta, "choices": args})

    if _is_dataclass_type(tp):
        return _build_dataclass(tp, value, path, ctx)

    if tp is bool:
        if not isinstance(value, bool):
            return ctx.err(path, f"{key}: expected bool (true/false), got {_describe(value)}")
        return _check_leaf(value, path, ctx, meta)

    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return ctx.err(path, f"{key}: expected int, got {_describe(value)}")
        return _check_leaf(value, path, ctx, meta)

    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ctx.err(path, f"{key}: expected float, got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value) and not meta.get("allow_nonfinite", False):
            return ctx.err(
                path, f"{key} = {value!r} is not a finite number (this field does not allow nan/inf)"
            )
        return _check_leaf(value, path, ctx, meta)

    if tp is str:
        if not isinstance(value, str):
            src = ctx.sources.get(path)
            # `name=2024` on the command line: the user typed a string that YAML read as a number.
            if (
                src is not None
                and src.kind == "override"
                and src.raw is not None
                and isinstance(value, (int, float, bool))
            ):
                value = src.raw
            else:
                return ctx.err(path, f"{key}: expected str, got {_describe(value)}")
        return _check_leaf(value, path, ctx, meta)

    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, Path):
            return tp(value)
        if not isinstance(value, str):
            return ctx.err(path, f"{key}: expected a path (str), got {_describe(value)}")
        return tp(value)

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if member.value == value and type(member.value) is type(value):
                return member
        if isinstance(value, str) and value in tp.__members__:
            return tp[value]
        valid = ", ".join(repr(m.value) for m in tp)
        return ctx.err(path, f"{key} = {value!r} is not one of {valid}")

    if origin in (list, Sequence) or tp in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            return ctx.err(path, f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        item_tp = args[0] if args else Any
        out = [_convert(v, item_tp, path + (i,), ctx, meta) for i, v in enumerate(value)]
        return _INVALID if any(o is _INVALID for o in out) else out

    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            return ctx.err(path, f"{key}: expected {_type_name(tp)} (a list), got {_describe(value)}")
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_types = [args[0] if args else Any] * len(value)
        else:
            if len(value) != len(args):
                return ctx.err(
                    path, f"{key}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}: {value!r}"
                )
            item_types = list(args)
        pairs = enumerate(zip(value, item_types, strict=True))
        out = [_convert(v, t, path + (i,), ctx, meta) for i, (v, t) in pairs]
        return _INVALID if any(o is _INVALID for o in out) else tuple(out)

    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            return ctx.err(path, f"{key}: expected {_type_name(tp)} (a mapping), got {_describe(value)}")
        ktp, vtp = args if len(args) == 2 else (Any, Any)
        result: dict[Any, Any] = {}
        bad = False
        for k, v in value.items():
            kk = _convert(k, ktp, path + (k,), ctx, {})
            vv = _convert(v, vtp, path + (k,), ctx, meta)
            if kk is _INVALID or vv is _INVALID:
                bad = True
            else:
                result[kk] = vv
        return _INVALID if bad else result

    if isinstance(tp, type) and isinstance(value, tp):
        return value
    return ctx.err(path, f"{key}: the config loader does not support fields of type {_type_name(tp)}")


def _blamed_field(path: tuple, fields: Mapping[str, Any], message: str, ctx: _Ctx) -> tuple:
    """The path of the first field a cross-field error message names, when a file or override set it (so the
    error points at the line that set it); else the section's own path."""
    for name in sorted(fields, key=len, reverse=True):  # the longest name first: 'mte_k' must not match 'mte_k_x'
        if re.search(rf"(^|[^A-Za-z0-9_]){re.escape(name)}([^A-Za-z0-9_]|$)", message):
            src = ctx.sources.get(path + (name,))
            if src is not None and src.kind != "default":
                return path + (name,)
    return path


def _build_dataclass(cls: type, value: Any, path: tuple, ctx: _Ctx) -> Any:
    where = _fmt(path) if path else cls.__name__
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = _to_plain(value)
    if not isinstance(value, Mapping):
        return ctx.err(path, f"{where}: expected a mapping for {cls.__name__}, got {_describe(value)}")
    hints = _hints(cls)
    flds = _init_fields(cls)
    n_errors = len(ctx.errors)
    renamed: Mapping[str, str] = getattr(cls, "RENAMED_KEYS", {})  # old name -> new, so old configs get a pointer
    removed: Mapping[str, str] = getattr(cls, "REMOVED_KEYS", {})  # old name -> why it went and what replaces it
    for k in value:
        if k not in flds:
            p = path + (k,)
            close = difflib.get_close_matches(str(k), list(flds), n=1, cutoff=0.6)
            hint = f"; did you mean '{_fmt(path + (close[0],))}'?" if close else ""
            if k in renamed:
                hint = f"; it was renamed to '{_fmt(path + (renamed[k],))}'"
            if k in removed:
                hint = f"; it was removed: {removed[k]}"
            section = f" of {_fmt(path)}" if path else ""
            ctx.err(p, f"unknown key '{_fmt(p)}'{hint} (valid keys{section}: {', '.join(flds)})")
    kwargs: dict[str, Any] = {}
    for name, f in flds.items():
        p = path + (name,)
        if name in value:
            out = _convert(value[name], hints[name], p, ctx, f.metadata)
            if out is not _INVALID:
                kwargs[name] = out
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            ctx.err(path, f"missing required key '{_fmt(p)}' ({_type_name(hints[name])})")
    if len(ctx.errors) > n_errors:
        return _INVALID
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks that span several fields
        return ctx.err(_blamed_field(path, flds, str(e), ctx), f"{where}: {e}")


# --------------------------------------------------------------------------------------------
# Entry points.


def _check_cls(cls: Any) -> None:
    if not _is_dataclass_type(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")


def _finish(cls: type[T], raw: dict[str, Any], sources: _Sources) -> T:
    ctx = _Ctx(sources, [])
    out = _convert(raw, cls, (), ctx, {})
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return out


def load_config(
    cls: type[T],
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build a ``cls``: defaults, then the YAML file ``path`` (and its ``base`` chain), then ``overrides``.

    ``path`` may be a list of files, layered in order (each with its own ``base`` chain): this is
    how ``margrpo compare`` puts a preset over the experiment's config.
    Raises :class:`ConfigError` listing every problem found, each with its file:line or override.
    """
    _check_cls(cls)
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not a single string")
    raw = _defaults(cls)
    sources: _Sources = {(): _Source("default", cls.__name__)}
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    for file in paths:
        for data, layer_sources in _load_layers(Path(file), ()):
            _merge_into(raw, data, cls, (), sources, layer_sources.get)
    for ov in overrides:
        _apply_override(raw, ov, cls, sources)
    return _finish(cls, raw, sources)


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Like :func:`load_config` for an in-memory mapping (merged over the defaults, same checks)."""
    _check_cls(cls)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {_describe(data)}")
    raw = _defaults(cls)
    sources: _Sources = {(): _Source("default", cls.__name__)}
    src = _Source("dict", source)
    _merge_into(raw, _to_plain(dict(data)), cls, (), sources, lambda p: src)
    return _finish(cls, raw, sources)
