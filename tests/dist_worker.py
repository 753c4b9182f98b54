"""A torchrun worker for tests/test_distributed.py: one tiny training run (or its resume) from argv.

Run as `torchrun --nproc_per_node=N tests/dist_worker.py MODEL_DIR OUT_DIR STEPS RESUME key=value ...`; every rank
builds the same `Trainer`, which joins the process group from torchrun's environment.
"""

from __future__ import annotations

import sys

import torch

torch.set_num_threads(1)


def main(argv: list[str]) -> None:
    from margrpo.rl.config import TrainConfig
    from margrpo.rl.trainer import Trainer
    from margrpo.utils.config import load_config

    model_dir, out, steps, resume, *extra = argv
    cfg = load_config(TrainConfig, None, [f"model={model_dir}", f"out_dir={out}", f"steps={steps}", *extra])
    Trainer(cfg, progress=False).run(resume=resume == "1")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
