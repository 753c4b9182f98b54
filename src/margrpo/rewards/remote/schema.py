"""Wire format of the reward server (version 1): JSON bodies, images as base64 PNG, never pickle.

Why: the reference's reward server exchanged pickles, which execute code on load and tie both ends
to one Python/library version. JSON + PNG is inspectable, language-neutral and lossless for 8-bit
images (rewards are computed on 8-bit images anyway, so remote and in-process scores are equal).

``GET /health`` -> 200::

    {"version": 1, "status": "ok", "rewards": {"<name>": {...describe()...}},
     "limits": {"max_body_bytes": int, "max_batch": int, "max_image_pixels": int}}

``POST /score`` (``Content-Type: application/json``; ``Authorization: Bearer <token>`` when the server
has a token) with::

    {"version": 1,
     "reward": "<name>",                # optional when the server hosts exactly one reward
     "prompts": ["...", ...],           # B strings
     "images": ["<base64 PNG>", ...],   # B images, 8-bit RGB (or L/RGBA, converted to RGB)
     "metadata": [{...}, ...]}          # optional, B JSON objects

-> 200::

    {"version": 1, "reward": "<name>",
     "scores": [float | null, ...],     # null exactly where valid is false
     "valid": [bool, ...],
     "reasons": [str | null, ...],
     "components": {"<sub-score>": [float | null, ...]},
     "categories": [str, ...] | null,
     "elapsed_s": float}

Errors are ``{"version": 1, "error": {"code": "<code>", "message": "<what and what is valid>"}}`` with
status 400 (``bad_json``, ``bad_request``, ``bad_image``, ``version_mismatch``), 401 (``unauthorized``),
404 (``not_found``, ``unknown_reward``), 405, 411 (``length_required``), 413 (``payload_too_large``,
``batch_too_large``, ``image_too_large``), 415 (``unsupported_media_type``), 500 (``reward_error``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..base import RewardOutput

__all__ = [
    "SCHEMA_VERSION",
    "Limits",
    "SchemaError",
    "encode_png_b64",
    "decode_png_b64",
    "make_score_request",
    "parse_score_request",
    "make_score_response",
    "parse_score_response",
    "error_body",
]

SCHEMA_VERSION = 1
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Limits:
    """Server-side request limits (defaults fit a 256-image batch of 512x512 PNGs)."""

    max_body_bytes: int = 256 * 1024 * 1024
    max_batch: int = 1024
    max_image_pixels: int = 4096 * 4096

    def as_dict(self) -> dict[str, int]:
        return {"max_body_bytes": self.max_body_bytes, "max_batch": self.max_batch,
                "max_image_pixels": self.max_image_pixels}


class SchemaError(ValueError):
    """A request/response that violates the schema; carries the HTTP status and error code to send."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"version": SCHEMA_VERSION, "error": {"code": code, "message": message}}


def encode_png_b64(image: Image.Image) -> str:
    """Losslessly encode an 8-bit image as base64 PNG (fast compression: these are throw-away)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png_b64(data: Any, *, index: int, max_pixels: int) -> Image.Image:
    """Decode one base64 PNG, refusing anything that is not a PNG or is larger than ``max_pixels``.

    The size is read from the header before decoding, so a small file that would decompress to a huge
    image (a "decompression bomb") is refused without allocating it.
    """
    if not isinstance(data, str):
        raise SchemaError("bad_image", f"images[{index}] must be a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SchemaError("bad_image", f"images[{index}] is not valid base64: {e}") from e
    if not raw.startswith(_PNG_MAGIC):
        raise SchemaError("bad_image", f"images[{index}] is not a PNG (only PNG is accepted)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            w, h = im.size
            if w * h > max_pixels:
                raise SchemaError("image_too_large", f"images[{index}] is {w}x{h} = {w * h} pixels, more than the "
                                  f"server's max_image_pixels={max_pixels}", status=413)
            im.load()
    except SchemaError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the client's bad input
        raise SchemaError("bad_image", f"images[{index}] could not be decoded as PNG: {e}") from e
    return im.convert("RGB") if im.mode != "RGB" else im


def make_score_request(images: Sequence[Image.Image], prompts: Sequence[str],
                       metadata: Sequence[Mapping[str, Any]] | None = None,
                       reward: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "prompts": list(prompts),
        "images": [encode_png_b64(im) for im in images],
    }
    if metadata is not None:
        body["metadata"] = [dict(m) for m in metadata]
    if reward is not None:
        body["reward"] = reward
    return body


def parse_score_request(obj: Any, limits: Limits, hosted: Sequence[str]
                        ) -> tuple[str, list[Image.Image], list[str], list[dict[str, Any]]]:
    """Validate a decoded request body; returns ``(reward_name, images, prompts, metadata)``."""
    if not isinstance(obj, dict):
        raise SchemaError("bad_request", f"request body must be a JSON object, got {type(obj).__name__}")
    if obj.get("version") != SCHEMA_VERSION:
        raise SchemaError("version_mismatch", f"request version {obj.get('version')!r} is not supported; this server "
                          f"speaks version {SCHEMA_VERSION}")
    unknown = sorted(set(obj) - {"version", "reward", "prompts", "images", "metadata"})
    if unknown:
        raise SchemaError("bad_request", f"unknown request fields {unknown}; valid: version, reward, prompts, images, "
                          "metadata")
    name = obj.get("reward")
    if name is None:
        if len(hosted) != 1:
            raise SchemaError("bad_request", f"field 'reward' is required: this server hosts {sorted(hosted)}")
        name = hosted[0]
    if not isinstance(name, str) or name not in hosted:
        raise SchemaError("unknown_reward", f"reward {name!r} is not hosted here; hosted: {sorted(hosted)}", 404)
    prompts, images = obj.get("prompts"), obj.get("images")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise SchemaError("bad_request", "field 'prompts' must be a list of strings")
    if not isinstance(images, list):
        raise SchemaError("bad_request", "field 'images' must be a list of base64 PNG strings")
    if len(images) != len(prompts):
        raise SchemaError("bad_request", f"got {len(images)} images but {len(prompts)} prompts; they must match")
    if len(images) > limits.max_batch:
        raise SchemaError("batch_too_large", f"batch of {len(images)} images exceeds the server's "
                          f"max_batch={limits.max_batch}; split it", 413)
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = [{} for _ in images]
    if not isinstance(metadata, list) or len(metadata) != len(images) or not all(isinstance(m, dict) for m in metadata):
        raise SchemaError("bad_request", f"field 'metadata' must be a list of {len(images)} JSON objects")
    pils = [decode_png_b64(d, index=i, max_pixels=limits.max_image_pixels) for i, d in enumerate(images)]
    return name, pils, prompts, metadata


def _floats(t: torch.Tensor) -> list[float | None]:
    return [None if not math.isfinite(x) else float(x) for x in t.tolist()]


def make_score_response(name: str, out: RewardOutput) -> dict[str, Any]:
    return {
        "version": SCHEMA_VERSION,
        "reward": name,
        "scores": _floats(out.scores),
        "valid": [bool(v) for v in out.valid.tolist()],
        "reasons": list(out.reasons),
        "components": {k: _floats(v) for k, v in out.components.items()},
        "categories": list(out.categories) if out.categories is not None else None,
        "elapsed_s": float(out.elapsed_s),
    }


def _tensor(values: Any, n: int, field: str) -> torch.Tensor:
    if not isinstance(values, list) or len(values) != n:
        raise SchemaError("bad_response", f"response field {field!r} must be a list of {n} numbers/nulls")
    try:
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise SchemaError("bad_response", f"response field {field!r}: {e}") from e


def parse_score_response(obj: Any, n: int) -> RewardOutput:
    """Rebuild the :class:`RewardOutput` of ``n`` samples; a null score is always treated as invalid."""
    if not isinstance(obj, dict) or obj.get("version") != SCHEMA_VERSION:
        raise SchemaError("bad_response", f"response is not a version-{SCHEMA_VERSION} score response: "
                          f"{str(obj)[:200]}")
    scores = _tensor(obj.get("scores"), n, "scores")
    valid_list = obj.get("valid")
    if not isinstance(valid_list, list) or len(valid_list) != n or not all(isinstance(v, bool) for v in valid_list):
        raise SchemaError("bad_response", f"response field 'valid' must be a list of {n} booleans")
    valid = torch.tensor(valid_list, dtype=torch.bool) & torch.isfinite(scores)
    reasons = obj.get("reasons") or [None] * n
    if len(reasons) != n:
        raise SchemaError("bad_response", f"response field 'reasons' must have {n} entries")
    reasons = [r if r is not None else (None if bool(valid[i]) else "nonfinite: remote score was null")
               for i, r in enumerate(reasons)]
    comps = {str(k): _tensor(v, n, f"components.{k}") for k, v in dict(obj.get("components") or {}).items()}
    cats = obj.get("categories")
    scores = torch.where(valid, scores, torch.full_like(scores, math.nan))
    return RewardOutput(scores, valid, comps, reasons, list(cats) if cats is not None else None,
                        float(obj.get("elapsed_s", 0.0)))
