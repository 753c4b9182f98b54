"""Run every benchmark (`make bench`); each writes JSON and a markdown table under benchmarks/results/."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS

BENCHMARKS = ["benchmarks.bench_sampling", "benchmarks.bench_train_step", "benchmarks.bench_distributed",
              "benchmarks.bench_rewards"]
# `--against REV` goes to the train step only: it runs the old revision whole in a worktree. The sampling
# benchmark's `--against` loads one old module into this package, which only works for revisions near this one.
TAKES_AGAINST = {"benchmarks.bench_train_step"}
GPU_BENCHMARKS = ["benchmarks.bench_gpu"]  # full-size models: only where a GPU is (`--tiny` runs it on a CPU)


def _without_against(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--against":
            skip = True
        elif not a.startswith("--against="):
            out.append(a)
    return out


def update_results(doc: Path) -> None:
    """Copy every results table into docs/results.md's bench-results block."""
    from margrpo.experiments.results_doc import write_block

    parts = []
    for md in sorted(RESULTS.glob("*.md")):
        meta = json.loads(md.with_suffix(".json").read_text()).get("meta", {})
        where = ", ".join(f"{k} {meta[k]}" for k in ("device", "dtype", "threads", "batch") if k in meta)
        parts.append(f"**{md.stem}** ({where or 'see JSON'}):\n\n{md.read_text().strip()}\n")
    write_block(doc, "\n".join(parts), start="<!-- bench-results:start -->", end="<!-- bench-results:end -->")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    for name in BENCHMARKS + (GPU_BENCHMARKS if torch.cuda.is_available() else []):
        print(f"== {name}")
        importlib.import_module(name).main(argv if name in TAKES_AGAINST else _without_against(argv))
    update_results(Path(__file__).resolve().parents[1] / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
