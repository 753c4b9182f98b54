"""Optimizer (and any nested) state <-> safetensors-ready tensors plus a JSON description, without pickle.

Checkpoints (`utils/checkpoint.py`) store the tensors in safetensors files and the description in `state.json`;
`state_from_tensors` rebuilds exactly the structure `state_to_tensors` took apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from margrpo.utils.checkpoint import CheckpointError

_T = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_FLOAT = "__float__"
_STATE_FORMAT = "margrpo-state/1"


def state_to_tensors(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a nested state (dicts, lists, tuples, scalars, tensors) into tensors + a JSON description.

    Tensors are replaced by references into the returned flat dict; tuples, non-str dict keys and
    nan/inf floats are tagged so :func:`state_from_tensors` rebuilds the exact same structure.
    """
    tensors: dict[str, torch.Tensor] = {}

    def sub(key: str, k: Any) -> str:
        return f"{key}.{k}" if key else str(k)

    def enc(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            if key in tensors:
                raise CheckpointError(f"state entry '{key}' would be stored twice; rename the keys")
            tensors[key] = x.detach()
            return {_T: key}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {_FLOAT: repr(x)}
        if isinstance(x, tuple):
            return {_TUPLE: [enc(v, sub(key, i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, sub(key, i)) for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            tags = (_T, _TUPLE, _ITEMS, _FLOAT)
            plain = all(isinstance(k, str) and k not in tags for k in x)
            if plain:
                return {k: enc(v, sub(key, k)) for k, v in x.items()}
            items = []
            for k, v in x.items():
                if isinstance(k, bool) or not isinstance(k, (int, str)):
                    raise CheckpointError(f"state entry '{key}' has a key of type {type(k).__name__}")
                items.append([k, enc(v, sub(key, k))])
            return {_ITEMS: items}
        raise CheckpointError(f"state entry '{key}' has unsupported type {type(x).__name__}")

    desc = enc(obj, "")
    return tensors, {"format": _STATE_FORMAT, "data": desc}


def state_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Any:
    """Inverse of :func:`state_to_tensors` (``meta`` may have been through JSON)."""
    if not isinstance(meta, Mapping) or meta.get("format") != _STATE_FORMAT:
        raise CheckpointError(f"not a {_STATE_FORMAT} description: {str(meta)[:100]!r}")

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if set(x) == {_T}:
                key = x[_T]
                if key not in tensors:
                    raise CheckpointError(f"tensor '{key}' named in the state is missing from the tensors")
                return tensors[key]
            if set(x) == {_TUPLE}:
                return tuple(dec(v) for v in x[_TUPLE])
            if set(x) == {_FLOAT}:
                return float(x[_FLOAT])
            if set(x) == {_ITEMS}:
                return {k: dec(v) for k, v in x[_ITEMS]}
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(meta["data"])


def optimizer_state_to_tensors(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``opt.state_dict()`` -> (tensors for a safetensors group, JSON-able meta for ``state.json``).

    Round-trips AdamW (and any torch optimizer) exactly, without pickle. Tensor names look like
    ``state.0.exp_avg``.
    """
    return state_to_tensors(dict(state_dict))


def optimizer_state_from_tensors(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """Rebuild the dict for ``opt.load_state_dict`` from :func:`optimizer_state_to_tensors` output."""
    return state_from_tensors(tensors, meta)


