"""metrics.jsonl writer (finite values, resume truncation), TensorBoard mirror, timers, plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from margrpo.utils.metrics import MetricsWriter, StepTimer, read_metrics, truncate_metrics
from margrpo.utils.plots import plot_comparison, plot_report, smooth_ema


def _run(run_dir: Path, steps: range, resume_step: int | None = None) -> None:
    with MetricsWriter(run_dir, tensorboard=False, resume_step=resume_step) as w:
        for s in steps:
            w.log(s, {"loss": 1.0 / (s + 1), "reward/shapes": s * 0.1}, kl=torch.tensor(0.5 * s))


def test_rows_and_types(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        row = w.log(0, {"a": 1, "b": np.float32(0.25), "c": torch.tensor([2.0]), "ok": True})
        # each line is on disk as soon as log() returns
        assert json.loads((tmp_path / "metrics.jsonl").read_text()) == row
    assert row == {"step": 0, "a": 1, "b": 0.25, "c": 2.0, "ok": 1}
    assert read_metrics(tmp_path) == [row]


def test_nonfinite_and_bad_values_raise_naming_key(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match=r"metric 'loss' at step 3 is nan"):
            w.log(3, {"loss": float("nan")})
        with pytest.raises(ValueError, match=r"metric 'kl' at step 3 is inf"):
            w.log(3, kl=torch.tensor(float("inf")))
        with pytest.raises(TypeError, match=r"metric 'name' at step 3 has type str"):
            w.log(3, {"name": "x"})
        with pytest.raises(TypeError, match=r"metric 'v' at step 3 is a tensor of 2 elements"):
            w.log(3, {"v": torch.ones(2)})
        w.log(5, {"x": 1.0})
        with pytest.raises(ValueError, match="must not go backwards"):
            w.log(4, {"x": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [5]  # failed calls wrote nothing


def test_crash_and_resume_gives_same_file(tmp_path: Path) -> None:
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    _run(clean, range(10))

    _run(crashed, range(7))  # logged up to step 6, but the last checkpoint was at step 4
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.1')  # torn line from the kill
    with pytest.warns(UserWarning, match="torn last line"):
        _run(crashed, range(5, 10), resume_step=4)

    assert (crashed / "metrics.jsonl").read_bytes() == (clean / "metrics.jsonl").read_bytes()


def test_new_run_refuses_to_overwrite(tmp_path: Path) -> None:
    _run(tmp_path, range(2))
    with pytest.raises(FileExistsError, match="resume_step"):
        MetricsWriter(tmp_path, tensorboard=False)
    MetricsWriter(tmp_path, tensorboard=False, overwrite=True).close()
    assert read_metrics(tmp_path) == []


def test_read_metrics_errors(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_metrics(p)
    p.write_text('{"step": 0}\n{"step": 1')
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_metrics(p) == [{"step": 0}]
    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0


def test_tensorboard_mirror(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        w.log(0, {"loss": 1.0})
        w.log(1, {"loss": 0.5})
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_step_timer() -> None:
    t = StepTimer()
    with t("rollout"):
        time.sleep(0.02)
    with t.phase("update"):
        pass
    with t("rollout"):
        pass
    assert t.counts == {"rollout": 2, "update": 1}
    s = t.summary()
    assert set(s) == {"time/rollout", "time/update", "time/total"}
    assert s["time/rollout"] >= 0.015 and s["time/total"] == pytest.approx(s["time/rollout"] + s["time/update"])
    assert t.totals == {}  # summary resets


def test_smooth_ema() -> None:
    assert np.allclose(smooth_ema([3.0, 3.0, 3.0], 0.9), 3.0)  # debiased: no pull towards 0
    assert np.array_equal(smooth_ema([1.0, 2.0], 0.0), [1.0, 2.0])


def test_plots(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 1.0 / (s + 1), "reward/a": s * 0.1, "reward/b": 0.5} for s in range(20)]
    p = plot_report(rows, ["loss", "reward/*", "missing"], tmp_path / "report.png", title="t", smoothing=0.6)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.width > 400
    runs = {
        "grpo": [[{"step": s, "acc": 0.1 * s + k} for s in range(5)] for k in range(3)],
        "mar-grpo": [[{"step": s, "acc": 0.2 * s} for s in range(5)]],
        "empty": [[{"step": 0}]],
    }
    q = plot_comparison(runs, "acc", tmp_path / "cmp.png")
    with Image.open(q) as im:
        assert im.format == "PNG"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
