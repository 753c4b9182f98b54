"""An on-disk cache for results that are a pure function of their inputs (the base model's sampler grid).

Why: the base model's guidance x temperature grid is the same in every `make demo` and `make compare` on one
machine and costs minutes; its key names everything that determines it, so a hit is the result a rerun would give.

Where: `$MARGRPO_CACHE_DIR`, else `$XDG_CACHE_HOME/margrpo`, else `~/.cache/margrpo`; one JSON file per entry,
`<kind>/<sha256 of the key>.json`, holding the key beside the payload. A file whose stored key differs from the one
asked for (a hash collision, a hand edit) or that does not parse is a miss, never a wrong hit. Deleting the folder
is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from margrpo.utils.atomic import atomic_write_text

__all__ = ["cache_root", "key_digest", "read_entry", "write_entry", "entry_path", "files_digest"]


def cache_root() -> Path:
    """The cache folder (module docstring)."""
    if os.environ.get("MARGRPO_CACHE_DIR"):
        return Path(os.environ["MARGRPO_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "margrpo"


def key_digest(key: dict[str, Any]) -> str:
    """SHA-256 of the key's canonical JSON (sorted keys), so equal keys name one file on every machine."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, allow_nan=False).encode()).hexdigest()


def entry_path(kind: str, key: dict[str, Any]) -> Path:
    return cache_root() / kind / f"{key_digest(key)}.json"


def read_entry(kind: str, key: dict[str, Any]) -> dict | None:
    """The payload stored under `key`, or None (no file, a file that does not parse, or a different stored key)."""
    path = entry_path(kind, key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"{path}: unreadable cache entry ({e}); computing it again", stacklevel=2)
        return None
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key, sort_keys=True)):
        return None
    return data.get("payload")


def write_entry(kind: str, key: dict[str, Any], payload: dict) -> Path:
    """Store `payload` under `key` (atomically: a reader never sees half a file)."""
    return atomic_write_text(entry_path(kind, key), json.dumps({"key": key, "payload": payload}, sort_keys=True))


def files_digest(folder: Path) -> str:
    """SHA-256 over every regular file below `folder`: relative path and bytes, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder to digest")
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel)
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
