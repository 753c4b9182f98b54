"""Weights & Biases mirror of `metrics.jsonl` (`log.wandb: true`): the same rows, at the same steps, rank 0 only.

`metrics.jsonl` stays the record of truth; W&B is a view of it. Only rank 0 writes (the rows are rank 0's, as in the
JSONL), so a DDP job makes one W&B run, not one per process. W&B's own environment variables choose the project
(WANDB_PROJECT, default margrpo), the run name (WANDB_NAME, default the run directory's), the mode (WANDB_MODE:
`offline` writes the run with no network, for `wandb sync` later) and where its files go (WANDB_DIR, default the run
directory). The W&B run id is kept in the run directory
(`wandb_id.txt`), so a resumed training run continues the same W&B run; W&B ignores steps it already holds, which
after a crash are the steps the resumed run repeats with the same values.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ID_FILE = "wandb_id.txt"


def is_rank_zero() -> bool:
    """True outside `torch.distributed`, and on its rank 0 when it is initialised."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class WandbMirror:
    """Forwards each row `MetricsWriter` writes to a W&B run (`log(row)`), and finishes the run on `close()`."""

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any] | None = None, resume: bool = False) -> None:
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / ID_FILE
        # the id names the W&B run, not a random draw of the training run (that RNG discipline is torch's)
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        save_dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "margrpo"),
                              name=os.environ.get("WANDB_NAME", run_dir.name), dir=str(save_dir),
                              config=dict(config or {}), id=run_id, resume="allow" if resume else None,
                              reinit="create_new")
        self.rows: list[dict[str, Any]] = []  # what was forwarded (the tests compare it with metrics.jsonl)

    def log(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.rows.append(dict(row))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
