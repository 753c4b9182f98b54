"""Atomic, pickle-free checkpoints in a run directory.

Layout::

    run_dir/checkpoints/
        step-100/            policy.safetensors, optimizer.safetensors, ..., state.json
        step-200/
        latest               text file: "step-200"

Why it is built this way:

- **Atomic.** A run killed while saving (pre-emption, OOM, Ctrl-C) must leave the previous
  checkpoint usable and ``latest`` pointing at it. Each checkpoint is written into a hidden
  temporary sibling (``.tmp-step-N-*``), every file and the directory are fsync'ed, and only then
  is it renamed to ``step-N``; the ``latest`` pointer is replaced with ``os.replace`` afterwards.
  A ``step-*`` directory therefore either is complete or does not exist.
- **Checked.** ``state.json`` holds a manifest (size and SHA-256 of every tensor file); a truncated or
  corrupted file is found before it is read, and resuming skips such a checkpoint for the previous one.
- **No pickle.** Tensors go into safetensors files; everything else (step, RNG states, data
  position, optimizer hyper-parameters) into ``state.json``. Loading one of our checkpoints never
  executes code. Foreign ``.pth`` files are read only through ``utils/safe_load.py``.
- **Optimizer state without pickle.** ``utils/tensor_state.py`` splits a ``state_dict()`` into tensors and a
  JSON description that restore it exactly.

One writer per run directory is assumed (rank 0): a save removes stale ``.tmp-*`` directories
left by earlier crashed saves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "point_latest",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
FORMAT = "margrpo-checkpoint/1"
_STEP_RE = re.compile(r"step-(\d+)")
_GROUP_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# Small filesystem helpers.


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _checkpoints_root(path: Path) -> Path:
    """``run_dir/checkpoints`` for a run dir; ``path`` itself when it already is that folder."""
    if not (path / CHECKPOINTS_DIR).is_dir() and path.name == CHECKPOINTS_DIR:
        return path
    return path / CHECKPOINTS_DIR


def _is_complete(d: Path) -> bool:
    return d.is_dir() and (d / STATE_FILE).is_file()


def _remove_dir(d: Path) -> None:
    """Rename first, then delete: a half-deleted ``step-N`` must never look like a checkpoint."""
    trash = d.parent / f"{_TRASH_PREFIX}{d.name}-{uuid.uuid4().hex[:8]}"
    os.rename(d, trash)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Writing.


def _prepare_group(group_name: str, group: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors refuses shared or strided ones)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in group.items():
        if not isinstance(name, str):
            raise CheckpointError(f"checkpoint group '{group_name}': tensor name {name!r} is not a str")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"checkpoint group '{group_name}': '{name}' is {type(t).__name__}, not a tensor "
                "(put non-tensor values into `state`)"
            )
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        elif (
            not t.is_contiguous()
            or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        ):
            t = t.clone(memory_format=torch.contiguous_format)
        out[name] = t.contiguous()
    # Tied weights (two names, one storage) must become two copies.
    seen: set[int] = set()
    for name, t in out.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            out[name] = t.clone()
        seen.add(ptr)
    return out


def _write_group(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors file and fsync it. (Tests patch this to simulate a crash mid-save.)"""
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(path)


def _find_bad_json(obj: Any, path: str) -> str | None:
    """The dotted key of the first value in ``obj`` that strict JSON cannot hold."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else f"{path} (= {obj!r}; JSON has no nan/inf)"
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{path}.{k!r} (key of type {type(k).__name__}; JSON keys must be str)"
            bad = _find_bad_json(v, f"{path}.{k}" if path else k)
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _find_bad_json(v, f"{path}[{i}]")
            if bad:
                return bad
        return None
    return f"{path} (type {type(obj).__name__})"


def _state_json(step: int, groups: list[str], state: Mapping[str, Any],
                files: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    if "_checkpoint" in state:
        raise CheckpointError("state key '_checkpoint' is reserved")
    if "step" in state and state["step"] != step:
        raise CheckpointError(f"state['step'] = {state['step']!r} disagrees with step={step}")
    payload = {"step": step, **{k: v for k, v in state.items() if k != "step"}}
    payload["_checkpoint"] = {"format": FORMAT, "groups": groups, "files": dict(files or {})}
    bad = _find_bad_json(payload, "")
    if bad:
        raise CheckpointError(f"checkpoint state is not JSON-serialisable at key {bad}")
    return json.dumps(payload, allow_nan=False)


def _file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file: the manifest entry that detects a truncated or corrupted checkpoint file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def verify_checkpoint(d: str | os.PathLike, groups: Iterable[str] | None = None) -> str | None:
    """None if checkpoint `d` is complete and every file matches its manifest, else what is wrong (naming the file).

    Checkpoints written before manifests existed have no `files` entry; they are only checked for presence.
    """
    d = Path(d)
    state_path = d / STATE_FILE
    try:
        payload = json.loads(state_path.read_text(encoding="utf-8"))
        meta = payload["_checkpoint"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{state_path}: unreadable or not a margrpo checkpoint state ({type(e).__name__}: {e})"
    try:
        files = meta.get("files") or {}
        names = [f"{g}.safetensors" for g in (meta.get("groups") or [])] if groups is None else \
            [f"{g}.safetensors" for g in groups]
        if groups is None:  # also folders moved in whole (a torch.distributed.checkpoint under dcp/)
            names += [n for n in files if n not in names]
        for name in names:
            f = d / name
            if not f.is_file():
                return f"{f}: missing (state.json lists it)"
            want = files.get(name)
            if want is None:
                continue
            if f.stat().st_size != int(want["bytes"]):
                return f"{f}: {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
            if _file_digest(f)["sha256"] != want["sha256"]:
                return f"{f}: SHA-256 differs from the manifest (corrupted)"
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a manifest that is itself damaged
        return f"{state_path}: malformed checkpoint manifest ({type(e).__name__}: {e})"
    return None


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    _write_text(tmp, name + "\n")
    os.replace(tmp, root / LATEST_FILE)
    _fsync_dir(root)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    extra_dirs: Mapping[str, str | os.PathLike] | None = None,
    protect: Iterable[int] = (),
) -> Path:
    """Atomically write ``run_dir/checkpoints/step-<step>/`` and point ``latest`` at it.

    ``tensors`` maps a group name (``"policy"``, ``"optimizer"``) to a flat dict of tensors, one
    safetensors file per group. ``state`` is any JSON-able dict (RNG states, data position, the
    optimizer's JSON half); it is stored in ``state.json`` together with ``step``. Re-saving an
    existing step replaces it. ``keep_last=k`` then deletes all but the k newest checkpoints and those of the steps
    in ``protect``.
    ``extra_dirs`` maps a name to a finished folder (a ``torch.distributed.checkpoint`` the ranks wrote) that is
    moved into the checkpoint before it is committed, its files in the manifest. Returns the checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    step = int(step)
    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1 or None, got {keep_last}")
    state = dict(state or {})
    groups = list(tensors)
    for g in groups:
        if not isinstance(g, str) or not _GROUP_RE.fullmatch(g) or g == Path(STATE_FILE).stem:
            raise CheckpointError(
                f"invalid checkpoint group name {g!r}: use letters, digits, '_', '.', '-' (and not 'state')"
            )
    _state_json(step, groups, state)  # fail before touching the disk

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # crashed earlier saves (single writer per run)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step-{step}-", dir=root))
    old: Path | None = None
    try:
        files = {}
        for g in groups:
            _write_group(tmp / f"{g}.safetensors", _prepare_group(g, tensors[g]))
            files[f"{g}.safetensors"] = _file_digest(tmp / f"{g}.safetensors")
        for name, src in (extra_dirs or {}).items():
            if not _GROUP_RE.fullmatch(name):
                raise CheckpointError(f"invalid extra folder name {name!r}")
            os.rename(src, tmp / name)
            for f in sorted((tmp / name).rglob("*")):
                if f.is_file():
                    _fsync_file(f)
                    files[f.relative_to(tmp).as_posix()] = _file_digest(f)
            _fsync_dir(tmp / name)
        _write_text(tmp / STATE_FILE, _state_json(step, groups, state, files))
        _fsync_dir(tmp)
        if final.exists():
            old = root / f"{_TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)  # put the previous copy of this step back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _write_latest(root, final.name)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last, protect)
    return final


def point_latest(run_dir: str | os.PathLike, step: int) -> Path:
    """Make the complete checkpoint of ``step`` the one to resume from (``latest``), e.g. an earlier one than the
    newest when the later ones hold weights a run should not continue from. Returns its directory."""
    root = _checkpoints_root(Path(run_dir))
    d = root / f"step-{int(step)}"
    if not _is_complete(d):
        raise CheckpointError(f"{d} is not a complete checkpoint")
    _write_latest(root, d.name)
    return d


def _list_complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.fullmatch(d.name)
        if m and _is_complete(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete ``step-*`` checkpoint directories, oldest first (temporary and partial ones skipped)."""
    return _list_complete(_checkpoints_root(Path(run_dir)))


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, protect: Iterable[int] = ()) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (never the one ``latest`` names, nor the steps in
    ``protect``: the trainer keeps the last one its reward-hacking monitors found within bounds).

    Also removes leftovers of interrupted deletions. Returns the deleted directories.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
    root = _checkpoints_root(Path(run_dir))
    ckpts = list_checkpoints(run_dir)
    protected = latest_checkpoint(run_dir)
    kept = {f"step-{int(s)}" for s in protect}
    removed = []
    for d in ckpts[: max(0, len(ckpts) - keep_last)]:
        if (protected is not None and d.resolve() == protected.resolve()) or d.name in kept:
            continue
        _remove_dir(d)
        removed.append(d)
    for trash in root.glob(f"{_TRASH_PREFIX}*"):
        shutil.rmtree(trash, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------------------------
# Reading.


def latest_checkpoint(run_dir: str | os.PathLike, verify: bool = False,
                      skipped: list[str] | None = None) -> Path | None:
    """The checkpoint to resume from, or None.

    Follows ``checkpoints/latest``; if that file is missing or names something gone or incomplete,
    falls back to the highest complete ``step-*``. Temporary ``.tmp-*`` directories are ignored.
    Accepts the run directory or its ``checkpoints`` folder. With ``verify``, a checkpoint whose files do
    not match their manifest (truncated, corrupted, missing) is skipped in favour of the previous complete
    one; each skipped one is logged and, when ``skipped`` is given, appended to it as "path: problem".
    """
    root = _checkpoints_root(Path(run_dir))
    if not root.is_dir():
        return None
    candidates = list(reversed(_list_complete(root)))
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        cand = root / name
        if _STEP_RE.fullmatch(name) and _is_complete(cand):
            candidates = [cand] + [c for c in candidates if c != cand]
        else:
            log.warning("%s names %r, which is not a complete checkpoint; scanning step-* instead", pointer, name)
    for cand in candidates:
        problem = verify_checkpoint(cand) if verify else None
        if problem is None:
            return cand
        log.warning("skipping checkpoint %s: %s", cand, problem)
        if skipped is not None:
            skipped.append(problem)
    return None


def load_checkpoint(
    path: str | os.PathLike, groups: Iterable[str] | None = None, device: str | torch.device = "cpu",
    verify: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Load ``(tensors, state)`` from a checkpoint directory, or the latest one of a run directory.

    ``tensors[group][name]`` are on ``device``; ``state`` is the saved state dict with ``step``.
    ``groups`` restricts which safetensors files are read. ``verify=False`` skips the manifest check, for a
    caller that has just run it (``latest_checkpoint(..., verify=True)``), so the files are hashed once.
    """
    p = Path(path)
    if _is_complete(p):
        d = p
    else:
        found = latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(
                f"no checkpoint in {p}: expected {p}/{STATE_FILE} "
                f"or {p}/{CHECKPOINTS_DIR}/step-*/{STATE_FILE}"
            )
        d = found
    state_path = d / STATE_FILE
    try:
        payload = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_path}: corrupt state file: {e}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{state_path}: expected a JSON object, got {type(payload).__name__}")
    meta = payload.pop("_checkpoint", {})
    available = list(meta.get("groups") or sorted(f.stem for f in d.glob("*.safetensors")))
    wanted = available if groups is None else list(groups)
    for g in wanted:
        if g not in available:
            raise CheckpointError(f"{d}: no tensor group '{g}' (available: {', '.join(available) or 'none'})")
        f = d / f"{g}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from checkpoint (state.json lists group '{g}')")
    problem = verify_checkpoint(d, wanted) if verify else None
    if problem is not None:
        raise CheckpointError(problem)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for g in wanted:
        f = d / f"{g}.safetensors"
        try:
            out[g] = load_file(str(f), device=str(device))
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file: {e}") from e
    return out, payload
