"""Models that ship inside the package (safetensors + config + model card), found by name."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def available_models() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())


def shipped_model_path(name: str = "shapes-base") -> Path:
    path = ASSETS / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no shipped model {name!r}; available: {available_models() or 'none'}")
    return path
