"""Run every benchmark (`make bench`); each writes JSON and a markdown table under benchmarks/results/."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["benchmarks.bench_sampling", "benchmarks.bench_train_step", "benchmarks.bench_rewards"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in BENCHMARKS:
        print(f"== {name}")
        importlib.import_module(name).main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
