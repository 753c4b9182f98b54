"""The benchmark scripts import (they run only under `make bench`, so nothing else would notice an API change)."""

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).parent.parent / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports_and_has_main(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path, monkeypatch):
    """`bench_gpu --tiny`: both model families' MAR-GRPO step (rollout + trajectory loss + AdamW) on a CPU in CI."""
    import json

    import benchmarks.common as common
    from benchmarks import bench_gpu

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    bench_gpu.main(["--device", "cpu", "--dtype", "float32", "--tiny", "--group", "4", "--mte-k", "2",
                    "--ar-steps-scored", "1", "--repeats", "1", "--name", "gpu_tiny"])
    rows = json.loads((tmp_path / "gpu_tiny.json").read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [("NOVA-0.6B", "mar-grpo"), ("NOVA-0.6B", "grpo"),
                                                          ("Harmon-1.5B", "mar-grpo"), ("Harmon-1.5B", "grpo")]
    assert all(r["s/step"] > 0 and r["rollout images/s"] > 0 and r["peak GB"] >= 0 for r in rows)
    assert all(r["time vs grpo"] > 0 for r in rows)
    assert (tmp_path / "gpu_tiny.md").read_text().startswith("| model |")


def test_peak_memory_sees_a_tensor_allocated_and_freed_inside_the_block():
    import torch

    from benchmarks.common import PeakMemory

    peak = PeakMemory("cpu")
    with peak.measure():
        x = torch.ones(8 * 2**20)  # 32 MiB
        del x
    if peak.method.startswith("peak RSS"):
        assert 28 * 2**20 < peak.peak_bytes < 64 * 2**20
