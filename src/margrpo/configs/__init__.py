"""Ready YAML configs shipped with the package (also visible as `configs/` at the repository root)."""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent


def config_path(name: str) -> Path:
    path = CONFIGS / name
    if not path.is_file():
        names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
        raise FileNotFoundError(f"no shipped config {name!r}; available: {names}")
    return path
