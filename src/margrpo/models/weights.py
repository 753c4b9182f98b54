"""Strict weight loading that reports every missing, unexpected and mis-shaped key at once."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def preserves_global_rng(fn: F) -> F:
    """Run a loader with torch's global CPU generator forked: building modules initialises their weights from it
    (before the file's weights replace them), and margrpo never lets a call advance the global RNG behind its
    caller's back (every draw of ours comes from an explicit `torch.Generator`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class WeightsMismatchError(ValueError):
    """Weights that do not fit a module; the message names the source and the keys."""


def load_state_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(state_dict)` after checking keys and shapes, naming `source` on failure."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: model {tuple(own[k].shape)} vs file {tuple(state_dict[k].shape)}"
                  for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the weights do not fit the {type(module).__name__} architecture"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {missing[:10]}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {unexpected[:10]}")
        if mismatched:
            lines.append(f"  mismatched ({len(mismatched)}): {mismatched[:10]}")
        raise WeightsMismatchError("\n".join(lines))
    module.load_state_dict(dict(state_dict))
