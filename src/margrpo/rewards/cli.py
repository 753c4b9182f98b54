"""``margrpo serve-reward``: host registered rewards over HTTP (see :mod:`margrpo.rewards.remote`).

The main CLI (``margrpo.cli``) calls :func:`add_serve_reward_parser` and dispatches to
:func:`run_serve_reward`. Examples::

    margrpo serve-reward --reward shapes --reward jpeg_compressibility
    margrpo serve-reward --config configs/rewards-hps.yaml --device cuda:0 --port 18085
    MARGRPO_REWARD_TOKEN=... margrpo serve-reward --config r.yaml --host 0.0.0.0

``--config`` reads a YAML/JSON file with a ``rewards:`` mapping in the training-config format (and an
optional ``reward_options:``); every entry is hosted under its label (weights are ignored: the
client's config weighs them). The token is best read from an environment variable or a file: `--token T`
exists for convenience, but a token on the command line can be read by other local users in the process list.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["add_serve_reward_parser", "run_serve_reward"]

log = logging.getLogger(__name__)


def add_serve_reward_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve-reward`` sub-command to an ``argparse`` sub-parsers object; returns its parser."""
    p = subparsers.add_parser(
        "serve-reward",
        help="host rewards over HTTP for remote scoring",
        description="Host registered rewards over HTTP (JSON + base64 PNG, GET /health, POST /score).",
    )
    p.add_argument("--reward", action="append", default=[], metavar="NAME",
                   help="registered reward to host with default options (repeatable)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML/JSON file with a 'rewards:' mapping (training-config format) to host")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; other addresses require a token)")
    p.add_argument("--port", type=int, default=18085, help="TCP port (default 18085; 0 = any free port)")
    p.add_argument("--token-env", default="MARGRPO_REWARD_TOKEN",
                   help="environment variable holding the bearer token (default MARGRPO_REWARD_TOKEN)")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token")
    p.add_argument("--token", default=None, metavar="T",
                   help="the bearer token itself (visible to other local users in the process list: prefer "
                        "--token-env or --token-file)")
    p.add_argument("--device", default="cpu", help="device for model-based rewards, e.g. cuda:0")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype for model-based rewards")
    p.add_argument("--max-body-mb", type=float, default=256.0, help="largest accepted request body in MiB")
    p.add_argument("--max-batch", type=int, default=1024, help="most images per request")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token is not None:
        if not args.token.strip():
            raise SystemExit("serve-reward: --token is empty")
        return args.token.strip()
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as e:
            raise SystemExit(f"serve-reward: cannot read --token-file {args.token_file}: {e}") from e
        if not token:
            raise SystemExit(f"serve-reward: --token-file {args.token_file} is empty")
        return token
    return os.environ.get(args.token_env) or None


def _load_spec(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import json

    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise SystemExit(f"serve-reward: cannot read --config {path}: {e}") from e
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("rewards"), dict):
        raise SystemExit(f"serve-reward: {path} has no 'rewards:' mapping (name: weight or name: {{options}})")
    return data["rewards"], dict(data.get("reward_options") or {})


def run_serve_reward(args: argparse.Namespace) -> int:
    """Build the rewards, start the server and serve until interrupted; returns the exit code."""
    from .registry import build_rewards
    from .remote.schema import Limits
    from .remote.server import RewardServer

    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(message)s")
    spec: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if args.config is not None:
        spec, options = _load_spec(args.config)
    for name in args.reward:
        if name in spec:
            raise SystemExit(f"serve-reward: reward {name!r} given twice (--reward and --config)")
        spec[name] = 1.0
    if not spec:
        raise SystemExit("serve-reward: nothing to host; give --reward NAME and/or --config FILE")
    token = _read_token(args)
    composite = build_rewards(spec, options, device=args.device, dtype=args.dtype)
    rewards = {label: reward for label, _w, reward in composite.parts}
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_batch=args.max_batch)
    try:
        server = RewardServer(rewards, host=args.host, port=args.port, token=token, limits=limits)
    except ValueError as e:
        raise SystemExit(f"serve-reward: {e}") from e
    print(f"serving {sorted(rewards)} at {server.url} (token {'required' if token else 'off'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m margrpo.rewards.cli serve-reward ...``) for before the main CLI wires it."""
    parser = argparse.ArgumentParser(prog="margrpo")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_reward_parser(sub)
    return run_serve_reward(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
