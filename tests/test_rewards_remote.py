"""Reward server and client over loopback: correctness, concurrency, limits, auth and failures.

All traffic goes to 127.0.0.1 on ports picked by the OS; every wait is bounded.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import margrpo
from margrpo.rewards import Reward, build_reward
from margrpo.rewards.remote import Limits, RemoteReward, RewardServer, RewardServerError, is_loopback_host
from margrpo.rewards.remote.schema import encode_png_b64

torch.set_num_threads(1)
SRC = str(Path(margrpo.__file__).resolve().parents[1])


class PixelMean(Reward):
    """Deterministic image-dependent reward with a sub-score, a nan for prompt 'bad' and a category."""

    name = "pixel_mean"

    def score_batch(self, images, prompts, metadata):
        vals = [float(np.asarray(im, dtype=np.float64).mean()) for im in images]
        vals = [math.nan if p == "bad" else v + m.get("offset", 0.0)
                for v, p, m in zip(vals, prompts, metadata, strict=True)]
        red = torch.tensor([float(np.asarray(im)[..., 0].mean()) for im in images])
        return torch.tensor(vals), {"red": red}, ["even" if i % 2 == 0 else "odd" for i in range(len(images))]


def _imgs(n: int, seed: int, size: int = 24) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def server():
    srv = RewardServer({"pixel_mean": PixelMean(), "jpeg": build_reward("jpeg_incompressibility")}, port=0).start()
    yield srv
    srv.shutdown()


def _raw(srv: RewardServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_remote_scores_equal_in_process_scores(server):
    x = _imgs(5, seed=0)
    prompts = ["a", "b", "bad", "c", "d"]
    meta = [{"offset": float(i)} for i in range(5)]
    local = PixelMean()(x, prompts, meta)
    remote = RemoteReward(url=server.url, reward="pixel_mean", batch_size=2)(x, prompts, meta)
    assert torch.equal(remote.valid, local.valid) and remote.valid.tolist() == [True, True, False, True, True]
    assert torch.equal(remote.scores[remote.valid], local.scores[local.valid])  # PNG is lossless
    assert torch.equal(remote.components["red"], local.components["red"])
    assert remote.categories == PixelMean(batch_size=2)(x, prompts, meta).categories  # labels travel too
    assert remote.reasons[2].startswith("nonfinite")
    jpeg = RemoteReward(url=server.url, reward="jpeg")(x, prompts)
    assert torch.equal(jpeg.scores, build_reward("jpeg_incompressibility")(x, prompts).scores)
    health = RemoteReward(url=server.url).health()
    assert health["status"] == "ok" and set(health["rewards"]) == {"pixel_mean", "jpeg"}
    assert health["limits"]["max_batch"] == Limits().max_batch


def test_concurrent_clients_get_their_own_results(server):
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            client = RemoteReward(url=server.url, reward="pixel_mean", timeout_s=30)
            ok = True
            for j in range(3):
                x = _imgs(3, seed=100 * k + j)
                ok &= torch.equal(client(x, ["p"] * 3).scores, PixelMean()(x, ["p"] * 3).scores)
            results[k] = ok
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == {k: True for k in range(4)}
    assert server.images_scored == 4 * 3 * 3


def test_malformed_requests_get_clear_4xx(server):
    js = {"Content-Type": "application/json"}
    status, body = _raw(server, "POST", "/score", b"{not json", js)
    assert status == 400 and body["error"]["code"] == "bad_json"
    good_png = encode_png_b64(Image.new("RGB", (4, 4)))
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    cases = [
        ({"version": 99, "prompts": [], "images": []}, 400, "version_mismatch"),
        ({"version": 1, "reward": "jpeg", "prompts": ["a"], "images": []}, 400, "bad_request"),
        ({"version": 1, "reward": "jpeg", "prompts": ["a"], "images": [good_png], "extra": 1}, 400, "bad_request"),
        ({"version": 1, "prompts": ["a"], "images": [good_png]}, 400, "bad_request"),  # two hosted: name it
        ({"version": 1, "reward": "nope", "prompts": ["a"], "images": [good_png]}, 404, "unknown_reward"),
        ({"version": 1, "reward": "jpeg", "prompts": ["a"], "images": [base64.b64encode(jpeg.getvalue()).decode()]},
         400, "bad_image"),
        ({"version": 1, "reward": "jpeg", "prompts": ["a"], "images": ["%%%"]}, 400, "bad_image"),
        ([1, 2], 400, "bad_request"),
    ]
    for obj, want_status, want_code in cases:
        status, body = _raw(server, "POST", "/score", json.dumps(obj).encode(), js)
        assert (status, body["error"]["code"]) == (want_status, want_code), obj
        assert body["error"]["message"]
    status, body = _raw(server, "POST", "/score", b"{}", {"Content-Type": "application/x-python-pickle"})
    assert status == 415
    status, body = _raw(server, "GET", "/nothing")
    assert status == 404 and "GET /health" in body["error"]["message"]
    with pytest.raises(RewardServerError, match="HTTP 404 unknown_reward") as ei:
        RemoteReward(url=server.url, reward="nope", catch_errors=False).score_remote([Image.new("RGB", (4, 4))], ["a"])
    assert ei.value.status == 404


def test_oversized_and_too_many_and_bomb_images_are_refused():
    srv = RewardServer({"jpeg": build_reward("jpeg_compressibility")}, port=0,
                       limits=Limits(max_body_bytes=20_000, max_batch=3, max_image_pixels=64 * 64)).start()
    try:
        # headers announcing a huge body: refused before reading any of it
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 999999999\r\n\r\n")
            chunks = []
            while chunk := s.recv(4096):  # the server answers, then closes
                chunks.append(chunk)
            head = b"".join(chunks).decode()
        assert head.startswith("HTTP/1.0 413") and "payload_too_large" in head
        client = RemoteReward(url=srv.url, retries=0, catch_errors=False)
        noisy = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (60, 60, 3), dtype=np.uint8))
                 for i in range(3)]
        with pytest.raises(RewardServerError, match="HTTP 413 payload_too_large.*max_body_bytes=20000") as ei:
            client.score_remote(noisy, ["a"] * 3)  # ~32 kB of PNG
        assert ei.value.status == 413
        small = [Image.new("RGB", (8, 8))] * 4
        with pytest.raises(RewardServerError, match="batch_too_large"):
            client.score_remote(small, ["a"] * 4)
        with pytest.raises(RewardServerError, match="image_too_large.*4096"):
            client.score_remote([Image.new("RGB", (65, 64))], ["a"])
        local = RemoteReward(url=srv.url, max_body_bytes=1000, catch_errors=False)
        with pytest.raises(RewardServerError, match="exceeds max_body_bytes=1000; lower batch_size"):
            local.score_remote(noisy, ["a"] * 3)
    finally:
        srv.shutdown()


def test_bearer_token_is_required_and_checked():
    srv = RewardServer({"jpeg": build_reward("jpeg_compressibility")}, port=0, token="s3cret-token").start()
    try:
        img = [Image.new("RGB", (8, 8))]
        for token in (None, "wrong"):
            with pytest.raises(RewardServerError, match="HTTP 401 unauthorized") as ei:
                RemoteReward(url=srv.url, token=token, token_env="MARGRPO_TEST_NO_SUCH_ENV",
                             catch_errors=False).score_remote(img, ["a"])
            assert ei.value.status == 401
        status, _ = _raw(srv, "GET", "/health")
        assert status == 401
        ok = RemoteReward(url=srv.url, token="s3cret-token")(img, ["a"])
        assert bool(ok.valid.all())
        os.environ["MARGRPO_TEST_TOKEN"] = "s3cret-token"
        try:
            assert RemoteReward(url=srv.url, token_env="MARGRPO_TEST_TOKEN").health()["status"] == "ok"
        finally:
            del os.environ["MARGRPO_TEST_TOKEN"]
    finally:
        srv.shutdown()


def test_non_loopback_bind_requires_token():
    assert is_loopback_host("127.0.0.1") and is_loopback_host("127.0.0.2") and is_loopback_host("::1")
    assert is_loopback_host("localhost") and not is_loopback_host("0.0.0.0") and not is_loopback_host("")
    assert not is_loopback_host("10.1.2.3") and not is_loopback_host("example.org")
    with pytest.raises(ValueError, match="refusing to bind the reward server to '0.0.0.0' without a bearer token"):
        RewardServer({"jpeg": build_reward("jpeg_compressibility")}, host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="empty bearer token"):
        RewardServer({"jpeg": build_reward("jpeg_compressibility")}, port=0, token="  ")


def test_server_down_gives_clear_error_after_bounded_retries():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RemoteReward(url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match=r"unreachable or failing after 3 attempts.*Connection ?Refused"):
        client.health()
    assert time.monotonic() - t0 < 5
    out = client(_imgs(2, seed=0), ["a", "b"])  # inside training: invalid samples with the reason
    assert not out.valid.any() and "unreachable" in out.reasons[0]


_SLOW_SERVER = """
import sys, time, torch
sys.path.insert(0, {src!r})
from margrpo.rewards import Reward
from margrpo.rewards.remote import RewardServer

class Slow(Reward):
    def score_batch(self, images, prompts, metadata):
        time.sleep(30)
        return torch.zeros(len(images))

srv = RewardServer({{"slow": Slow()}}, port=0)
print(srv.port, flush=True)
srv.serve_forever()
"""


def test_server_killed_mid_request_gives_clear_client_error():
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SERVER.format(src=SRC)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        client = RemoteReward(url=f"http://127.0.0.1:{port}", timeout_s=20, retries=2, backoff_s=0.05,
                              catch_errors=False)
        box: dict[str, BaseException | None] = {"err": None}

        def call() -> None:
            try:
                client.score_remote([Image.new("RGB", (8, 8))], ["a"])
            except BaseException as e:  # noqa: BLE001
                box["err"] = e

        t = threading.Thread(target=call)
        t0 = time.monotonic()
        t.start()
        time.sleep(1.0)  # the request is now inside the 30 s scoring call
        proc.kill()
        t.join(timeout=15)
        assert not t.is_alive(), "client hung after the server died"
        err = box["err"]
        assert isinstance(err, RewardServerError), err
        msg = str(err)
        assert "after 3 attempts" in msg and f"127.0.0.1:{port}" in msg and "serve-reward" in msg
        assert ("RemoteDisconnected" in msg or "ConnectionRefused" in msg or "ConnectionReset" in msg), msg
        assert time.monotonic() - t0 < 15
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_cli_serves_and_refuses_unsafe_bind():
    env = {**os.environ, "PYTHONPATH": SRC, "MARGRPO_REWARD_TOKEN": ""}
    cmd = [sys.executable, "-m", "margrpo.rewards.cli", "serve-reward", "--reward", "jpeg_compressibility",
           "--port", "0", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving ['jpeg_compressibility'] at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]
        client = RemoteReward(url=url)
        assert client.health()["status"] == "ok"
        x = _imgs(2, seed=3)
        assert torch.equal(client(x, ["a", "b"]).scores, build_reward("jpeg_compressibility")(x, ["a", "b"]).scores)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([*cmd[:-2], "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and "refusing to bind" in bad.stderr


def test_too_many_connections_get_503_at_once_and_slow_clients_time_out():
    import socket

    srv = RewardServer({"jpeg": build_reward("jpeg_compressibility")}, port=0, max_connections=1,
                       request_timeout_s=1.0).start()
    try:
        slow = socket.create_connection(("127.0.0.1", srv.port))  # holds the one slot, sends nothing
        time.sleep(0.2)
        t0 = time.perf_counter()
        status, body = _raw(srv, "GET", "/health")
        assert status == 503 and body["error"]["code"] == "busy" and time.perf_counter() - t0 < 1.0
        slow.settimeout(5)
        assert slow.recv(1024) == b""  # the server drops the stalled client after request_timeout_s
        slow.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the slot comes back once the stalled request times out
            status, _ = _raw(srv, "GET", "/health")
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200
    finally:
        srv.shutdown()
    with pytest.raises(ValueError, match="max_connections"):
        RewardServer({"jpeg": build_reward("jpeg_compressibility")}, port=0, max_connections=0)
