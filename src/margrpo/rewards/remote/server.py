"""HTTP server hosting registered rewards (``margrpo serve-reward``); standard library only.

Safety properties, each because a reward server holds a GPU and large models and is easy to expose
by accident:

- binds to 127.0.0.1 by default; any non-loopback address is refused unless a bearer token is
  configured, and with a token every endpoint requires ``Authorization: Bearer <token>`` (compared in
  constant time);
- the body size is checked from ``Content-Length`` *before* reading (413 without reading it; 411 when
  absent), batches and image sizes are bounded, images must be PNG, bodies must be JSON (no pickle);
- slow clients time out (``request_timeout_s``), and each reward is called under its own lock, so
  concurrent requests queue instead of running two forward passes on one model at once;
- at most ``max_connections`` requests are handled at once: the next get 503 with ``Retry-After`` at once
  (a bounded queue, not a thread per connection).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..base import RewardFn
from .schema import SCHEMA_VERSION, Limits, SchemaError, error_body, make_score_response, parse_score_request

__all__ = ["RewardServer", "is_loopback_host"]

log = logging.getLogger(__name__)

_DRAIN_BYTES = 4 * 1024 * 1024  # most unread body bytes discarded after refusing a request


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for wildcard and any other address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer  # type: ignore[assignment]
    server_version = "margrpo-reward/1"

    def setup(self) -> None:
        self.timeout = self.server.owner.request_timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    # --- helpers
    def _send_json(self, status: int, obj: Mapping[str, Any], *, close: bool = False) -> None:
        data = json.dumps(obj, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="margrpo-reward"')
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        self._send_json(status, error_body(code, message), close=close)

    def _refuse_unread(self, status: int, code: str, message: str) -> None:
        """Answer without reading the body, then close gracefully.

        Closing a socket that still holds unread request bytes makes the kernel send a reset, which can
        destroy the answer before the client reads it; so: answer, half-close, drain briefly (bounded in
        bytes and time), close. The client then sees the status and the reason instead of a reset.
        """
        self._error(status, code, message, close=True)
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            drained = 0
            while drained < _DRAIN_BYTES:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def _authorized(self) -> bool:
        token = self.server.owner.token
        if token is None:
            return True
        got = self.headers.get("Authorization", "")
        ok = got.startswith("Bearer ") and hmac.compare_digest(got[len("Bearer "):].encode(), token.encode())
        if not ok:
            self._refuse_unread(401, "unauthorized",
                                "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
        return ok

    # --- endpoints
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path != "/health":
            self._error(404, "not_found", f"no endpoint GET {self.path}; valid: GET /health, POST /score")
            return
        if not self._authorized():
            return
        owner = self.server.owner
        self._send_json(200, {"version": SCHEMA_VERSION, "status": "ok",
                              "rewards": {n: _describe(r) for n, r in owner.rewards.items()},
                              "limits": owner.limits.as_dict()})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._refuse_unread(404, "not_found", f"no endpoint POST {self.path}; valid: GET /health, POST /score")
            return
        if not self._authorized():
            return
        owner = self.server.owner
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._refuse_unread(415, "unsupported_media_type", f"Content-Type must be application/json, got {ctype!r}")
            return
        if self.headers.get("Transfer-Encoding"):
            self._refuse_unread(411, "length_required", "chunked bodies are not accepted; send Content-Length")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self._refuse_unread(411, "length_required", "a valid Content-Length header is required")
            return
        if length > owner.limits.max_body_bytes:
            self._refuse_unread(413, "payload_too_large", f"body of {length} bytes exceeds the server's "
                                f"max_body_bytes={owner.limits.max_body_bytes}; send smaller batches")
            return
        raw = self.rfile.read(length)
        if len(raw) != length:
            self._error(400, "bad_request", f"body ended after {len(raw)} of {length} bytes", close=True)
            return
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._error(400, "bad_json", f"body is not valid JSON: {e}")
            return
        try:
            name, images, prompts, metadata = parse_score_request(obj, owner.limits, list(owner.rewards))
        except SchemaError as e:
            self._error(e.status, e.code, str(e))
            return
        t0 = time.perf_counter()
        try:
            with owner.locks[name]:
                out = owner.rewards[name](images, prompts, metadata)
        except Exception as e:  # noqa: BLE001 - reported to the client, which marks the samples invalid
            log.exception("reward %s raised", name)
            self._error(500, "reward_error", f"reward {name!r} raised {type(e).__name__}: {e}")
            return
        owner.count(len(images), time.perf_counter() - t0)
        self._send_json(200, make_score_response(name, out))


def _describe(r: RewardFn) -> dict[str, Any]:
    try:
        d = r.describe()  # type: ignore[attr-defined]
    except AttributeError:
        d = {"name": r.name}
    return json.loads(json.dumps(d, default=str))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], owner: RewardServer) -> None:
        self.owner = owner
        self.slots = threading.BoundedSemaphore(owner.max_connections)
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address) -> None:
        """At most `max_connections` requests are handled at once; the next ones get 503 at once, not a thread."""
        if not self.slots.acquire(blocking=False):
            body = json.dumps(error_body("busy", f"the server handles {self.owner.max_connections} connections at "
                                                 "once; retry later")).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
                # half-close and drain what the client already sent (bounded: this is the accept thread), so that
                # closing does not reset the connection before the client reads the 503 (see _refuse_unread)
                request.shutdown(socket.SHUT_WR)
                request.settimeout(0.05)
                drained = 0
                while drained < _DRAIN_BYTES:
                    chunk = request.recv(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no handler thread started: give its slot back
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class RewardServer:
    """Serve ``rewards`` (label -> reward) over HTTP.

    Args:
        rewards: what to host; the label is the ``reward`` field clients send.
        host: bind address; loopback by default. Non-loopback requires ``token``.
        port: TCP port (0 picks a free one; see :attr:`port` after construction).
        token: bearer token required on every endpoint when set.
        limits: body/batch/image limits.
        request_timeout_s: socket timeout for reading a request (slow or stalled clients).
        max_connections: requests handled at once; beyond them the server answers 503 with Retry-After.
    """

    def __init__(self, rewards: Mapping[str, RewardFn], *, host: str = "127.0.0.1", port: int = 18085,
                 token: str | None = None, limits: Limits | None = None, request_timeout_s: float = 60.0,
                 max_connections: int = 16) -> None:
        if not rewards:
            raise ValueError("RewardServer needs at least one reward to host")
        if token is not None and not token.strip():
            raise ValueError("an empty bearer token is not a token; unset it or give a real one")
        if not is_loopback_host(host) and token is None:
            raise ValueError(f"refusing to bind the reward server to {host!r} without a bearer token: anyone on the "
                             "network could use its GPU. Set a token (env MARGRPO_REWARD_TOKEN or --token-file) or "
                             "bind to 127.0.0.1")
        self.rewards = dict(rewards)
        self.locks = {n: threading.Lock() for n in self.rewards}
        self.token = token
        self.limits = limits or Limits()
        self.request_timeout_s = float(request_timeout_s)
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.max_connections = int(max_connections)
        self._stats_lock = threading.Lock()
        self.images_scored = 0
        self.seconds_scoring = 0.0
        self._httpd = _HTTPServer((host, port), self)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def count(self, n: int, seconds: float) -> None:
        with self._stats_lock:
            self.images_scored += n
            self.seconds_scoring += seconds

    def start(self) -> RewardServer:
        """Serve from a background thread (tests, or a trainer hosting its own server)."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="reward-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        log.info("serving rewards %s at %s", sorted(self.rewards), self.url)
        self._httpd.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
