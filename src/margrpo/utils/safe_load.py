"""Reading other people's `.pth` files: `torch.load(weights_only=True)` with an explicit allow-list."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from margrpo.utils.checkpoint import CheckpointError

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(
    path: str | os.PathLike, allow: Iterable[Any] | None = None, map_location: Any = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` with an explicit allow-list of extra globals.

    Old checkpoints (e.g. LTH14/mar ``checkpoint-last.pth``) pickle objects such as
    ``argparse.Namespace``; pass those classes in ``allow``. Anything else is refused, and the
    error names the file and the global that would have been unpickled.
    """
    path = Path(path)
    allow = list(allow or [])
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names: list[str] = []
        try:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            pass
        if not names:
            names = _GLOBAL_RE.findall(str(e))
        allowed = {f"{getattr(a, '__module__', '')}.{getattr(a, '__qualname__', a)}" for a in allow}
        names = [n for n in names if n not in allowed] or names
        if not names:  # not a disallowed global: a corrupt or unusual file; quote torch (minus ANSI codes)
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
            reason = next((ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln), lines[-1])
            raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {reason}") from e
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused to unpickle the global(s) {', '.join(names)}. "
            "If you trust this file, pass those classes in allow=[...] to safe_torch_load."
        ) from e
    except RuntimeError as e:  # e.g. a truncated zip archive; torch's message does not name the file
        raise CheckpointError(f"{path}: cannot be loaded: {e}") from e
