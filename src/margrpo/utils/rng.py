"""Explicit, reproducible randomness.

Every random draw in margrpo comes from a generator built here and passed down explicitly. A run
is reproducible, and resumable bit-for-bit, only if no code path touches the global RNGs
(``torch.manual_seed``, ``numpy.random.seed``, ``random.seed``): a library or a user callback
that draws from them would otherwise shift every later sample. So each consumer gets its own
stream, named by the run seed plus stream ids such as ``("rollout", rank, step)``; the stream's
seed is a hash of those ids, so streams never overlap by accident (unlike ``seed + rank``, where
rank 1 of seed 0 equals rank 0 of seed 1) and adding a new stream does not move the others.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "derive_seed",
    "make_generator",
    "generator_state",
    "set_generator_state",
    "numpy_rng",
]

_SEED_BITS = 63  # fits torch's int64 seed and numpy's SeedSequence without sign issues


def _encode_stream(part: str | int) -> bytes:
    """Type-tagged, length-prefixed encoding so that ("a.b",) and ("a", "b"), or 1 and "1", differ."""
    if isinstance(part, bool):
        # bool is an int subclass; accepting it silently would make True == 1 collide.
        raise TypeError(f"stream id {part!r} is a bool; use a str or an int")
    if isinstance(part, str):
        data = part.encode("utf-8")
        tag = b"s"
    else:
        try:
            value = operator.index(part)  # accepts numpy integers too
        except TypeError:
            raise TypeError(
                f"stream id {part!r} has type {type(part).__name__}; stream ids must be str or int"
            ) from None
        data = str(value).encode("ascii")
        tag = b"i"
    return tag + len(data).to_bytes(4, "big") + data


def derive_seed(seed: int, *streams: str | int) -> int:
    """Return a 63-bit seed for the stream ``streams`` of run seed ``seed``.

    The same (seed, streams) always gives the same value on every machine and Python version
    (sha256, not ``hash()``, which is salted per process).
    """
    h = hashlib.sha256(b"margrpo-rng/1\0")
    h.update(_encode_stream(operator.index(seed)))
    for part in streams:
        h.update(_encode_stream(part))
    return int.from_bytes(h.digest()[:8], "big") >> (64 - _SEED_BITS)


def make_generator(seed: int, *streams: str | int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded for the stream ``(seed, *streams)``.

    Example: ``make_generator(cfg.seed, "rollout", rank, step)``.
    """
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *streams))
    return g


def generator_state(g: torch.Generator) -> list[int]:
    """The generator's full state as a list of byte values, so it can go into ``state.json``."""
    return g.get_state().tolist()


def set_generator_state(g: torch.Generator, state: Sequence[int]) -> torch.Generator:
    """Restore a state produced by :func:`generator_state` (in place; returns ``g`` for chaining)."""
    t = torch.tensor(list(state), dtype=torch.uint8)
    g.set_state(t)
    return g


def numpy_rng(seed: int, *streams: str | int) -> np.random.Generator:
    """A ``numpy.random.Generator`` (PCG64) for the stream ``(seed, *streams)``.

    Its state, ``rng.bit_generator.state``, is a JSON-able dict of ints and strings; restore it by
    assigning to ``rng.bit_generator.state``.
    """
    return np.random.default_rng(derive_seed(seed, *streams))
