"""Client reward that scores on a ``margrpo serve-reward`` server; standard library only.

It is a :class:`~margrpo.rewards.base.Reward`, so it can be a part of a composite like any in-process reward.
Requests are
split into ``batch_size`` chunks; each chunk is retried (bounded, exponential backoff) on connection
errors, timeouts and 5xx answers, never on 4xx (those are the request's fault and would fail again).
When every attempt fails, :class:`RewardServerError` says which server, how many attempts, for how long,
and the last error; inside training (``catch_errors=True``) that becomes the samples' invalid reason,
which :class:`~margrpo.rewards.base.RewardFailureGuard` reports if the losses pile up.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import torch
from PIL import Image

from ..base import Reward, RewardOutput, ScoreResult
from ..registry import register_reward
from .schema import SchemaError, make_score_request, parse_score_response

__all__ = ["RemoteReward", "RewardServerError"]

TOKEN_ENV = "MARGRPO_REWARD_TOKEN"


class RewardServerError(RuntimeError):
    """The reward server could not be reached or refused the request.

    ``status`` is the HTTP status (None when no answer came), ``code`` the server's error code.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


_RETRY_STATUS = {500, 502, 503, 504}
_NET_ERRORS = (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException, OSError)


@register_reward("remote")
class RemoteReward(Reward):
    """A reward computed by a remote ``margrpo serve-reward``.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:18085``.
        reward: name of the hosted reward (may be omitted when the server hosts exactly one).
        token: bearer token; by default read from the environment variable ``token_env``.
        token_env: environment variable holding the token (keeps it out of config files).
        timeout_s: socket timeout per attempt (connect and each read).
        retries: extra attempts after the first (so ``retries + 1`` in all).
        backoff_s / max_backoff_s: first wait between attempts, doubling up to the cap.
        batch_size: images per request.
        max_body_bytes: refuse (locally, before sending) requests larger than this.
    """

    def __init__(self, *, url: str, reward: str | None = None, token: str | None = None,
                 token_env: str = TOKEN_ENV, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, max_body_bytes: int = 256 * 1024 * 1024, **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", 64)
        kwargs.pop("dtype", None)  # computed remotely
        super().__init__(**kwargs)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote: url must start with http:// or https://, got {url!r}")
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"remote: need retries >= 0, timeout_s > 0, backoff_s >= 0; got {retries}, {timeout_s}, "
                             f"{backoff_s}")
        self.url = url.rstrip("/")
        self.reward = reward
        self.token = token if token is not None else (os.environ.get(token_env) or None)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_body_bytes = int(max_body_bytes)
        self.name = f"remote:{reward}" if reward else "remote"
        # No proxies: a reward server is an internal service, and an http_proxy in the environment must
        # not silently route loopback traffic (and the bearer token) through a proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url, "reward": self.reward}

    # --- HTTP
    def _headers(self, body: bool) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if body:
            h["Content-Type"] = "application/json"
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _request(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        url = f"{self.url}{path}"
        attempts = self.retries + 1
        t0 = time.monotonic()
        last: str = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            req = urllib.request.Request(url, data=data, method=method, headers=self._headers(data is not None))
            try:
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                code, msg = _error_detail(e)
                if e.code in _RETRY_STATUS:
                    last = f"HTTP {e.code} {code}: {msg}"
                    continue
                raise RewardServerError(f"reward server {url} refused the request: HTTP {e.code} {code}: {msg}",
                                        status=e.code, code=code) from None
            except urllib.error.URLError as e:
                last = f"{type(e.reason).__name__}: {e.reason}"
            except _NET_ERRORS as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            except json.JSONDecodeError as e:
                last = f"answer is not JSON: {e}"
        raise RewardServerError(
            f"reward server {url} unreachable or failing after {attempts} attempts over "
            f"{time.monotonic() - t0:.1f}s; last error: {last}. Is `margrpo serve-reward` running at {self.url}?"
        )

    def health(self) -> dict[str, Any]:
        """``GET /health`` (raises :class:`RewardServerError` when the server is down)."""
        return self._request("GET", "/health", None)

    def score_remote(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]] | None = None) -> RewardOutput:
        """One request; raises :class:`RewardServerError` instead of returning invalid samples."""
        try:
            body = json.dumps(make_score_request(images, prompts, metadata, self.reward), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ValueError(f"remote: metadata must be JSON-serialisable (no tensors/nan): {e}") from e
        if len(body) > self.max_body_bytes:
            raise RewardServerError(f"request of {len(body)} bytes exceeds max_body_bytes={self.max_body_bytes}; "
                                    "lower batch_size", code="payload_too_large")
        obj = self._request("POST", "/score", body)
        try:
            return parse_score_response(obj, len(images))
        except SchemaError as e:
            raise RewardServerError(f"reward server {self.url} sent a malformed answer: {e}", code=e.code) from e

    # --- Reward plumbing
    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        out = self.score_remote(images, prompts, metadata)
        return out.scores, out.components

    def _score_chunk(self, images: list[Image.Image], prompts: list[str], meta: list[dict[str, Any]],
                     pre_reasons: list[str | None]) -> RewardOutput:
        """Keep the server's validity and reasons (not just its scores); merge local input problems."""
        n = len(images)
        try:
            out = self.score_remote(images, prompts, meta)
        except Exception as exc:  # noqa: BLE001 - becomes per-sample reasons, see RewardFailureGuard
            if not self.catch_errors:
                raise
            msg = f"error: {self.name}: {type(exc).__name__}: {exc}"
            return RewardOutput(torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool), reasons=[msg] * n)
        for i, r in enumerate(pre_reasons):
            if r is not None:
                out.valid[i] = False
                out.scores[i] = float("nan")
                out.reasons[i] = r
        return out


def _error_detail(e: urllib.error.HTTPError) -> tuple[str, str]:
    try:
        err = json.loads(e.read()).get("error", {})
        return str(err.get("code", "")), str(err.get("message", ""))
    except Exception:  # noqa: BLE001 - a non-JSON error page
        return "", e.reason if isinstance(e.reason, str) else str(e.reason)
