"""Loading transformers model folders for the rewards: local files only, one clear error, frozen and placed.

Grounding DINO, OWLv2 and GIT ship as transformers folders (``config.json`` + weights + processor files:
``preprocessor_config.json`` and the tokenizer's files); each reward reads one with these two calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_hf_model", "load_hf_processor", "model_dir"]


def model_dir(path: str | os.PathLike, *, what: str, hint: str) -> Path:
    """``path`` as a transformers model folder, or FileNotFoundError naming the option and what belongs there."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {p} is not a transformers model folder (no config.json); expected {hint}")
    return p


def load_hf_model(cls: Any, path: Path, *, device: torch.device, dtype: torch.dtype, what: str) -> Any:
    """``cls.from_pretrained(path)`` from local files, in eval mode, gradients off, on ``device`` in ``dtype``."""
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: cannot load {cls.__name__} from {path}: {e}") from e
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def load_hf_processor(path: Path, *, what: str) -> Any:
    """The folder's processor (image processor + tokenizer) from local files."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{what}: cannot load the processor (preprocessor_config.json + tokenizer files) from "
                         f"{path}: {e}") from e
