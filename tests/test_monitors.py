"""Reward-hacking monitors: image statistics against hand-worked images, drift arithmetic, persistence, bounds."""

import json

import numpy as np
import pytest
import torch

from margrpo.rl.monitors import DEFAULT_BOUNDS, DriftMonitor, compare, effective_bounds, report_series
from margrpo.utils.image_stats import STATISTICS, image_statistics, jpeg_size_kb, to_uint8
from margrpo.utils.images import to_pil


def images(*arrays: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> the [N, 3, H, W] floats in [-1, 1] a model decodes (exact on uint8 values)."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).double()
    return (x / 127.5 - 1).float()


def solid(rgb, size=32) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (size, size, 3)).copy()


def test_float_images_round_to_the_pixels_a_user_sees():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    x = images(*arr)
    assert np.array_equal(to_uint8(x), arr)
    assert np.array_equal(to_uint8(x)[0], np.asarray(to_pil(x)[0]))


def test_brightness_and_saturation_of_known_pixels():
    half = solid((0, 0, 0))
    half[:, 16:] = 255
    s = image_statistics(images(solid((255, 0, 0)), solid((255, 255, 255)), half, solid((128, 128, 128)),
                                solid((200, 100, 100))), period=8)
    np.testing.assert_allclose(s["brightness"], [0.299, 1.0, 0.5, 128 / 255, (0.299 * 200 + 0.701 * 100) / 255])
    # (max - min) / max per pixel; black pixels (max 0) count 0
    np.testing.assert_allclose(s["saturation"], [1.0, 0.0, 0.0, 0.0, 0.5])


def test_colour_entropy_counts_bits_of_the_quantised_colour_histogram():
    two = solid((220, 30, 30))
    two[16:] = (30, 30, 220)  # half red, half blue: 1 bit
    four = solid((0, 0, 0))
    four[:16, 16:], four[16:, :16], four[16:, 16:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)  # 2 bits
    near = solid((200, 0, 0))
    near[::2] = (210, 5, 5)  # two colours in one bin (top 3 bits 110, 000, 000): 0 bits
    s = image_statistics(images(solid((220, 30, 30)), two, four, near), period=8)
    np.testing.assert_allclose(s["colour_entropy"], [0.0, 1.0, 2.0, 0.0], atol=1e-12)


def test_grid_energy_is_the_share_of_variance_that_repeats_with_the_token_period():
    grid = solid((0, 0, 0))
    grid[::8], grid[:, ::8] = 255, 255  # a line along every token border: all of it repeats every 8 px
    faint = grid // 8 + 100  # the same grid, fainter and brighter: the same share
    cells = np.zeros((32, 32, 3), dtype=np.uint8)
    cells[(np.arange(32)[:, None] // 8 + np.arange(32)[None] // 8) % 2 == 1] = 255  # token-sized checkerboard
    ramp = np.repeat(np.repeat((np.arange(32, dtype=np.uint8) * 8)[None, :, None], 32, 0), 3, 2)
    s = image_statistics(images(grid, faint, cells, ramp, solid((40, 200, 90))), period=8)["grid_energy"]
    # the token-sized checkerboard repeats every 16 px, not 8: every tile position averages to the same grey. A
    # ramp's periodic part is the ramp within one tile: variance (p^2 - 1) / 12 of (W^2 - 1) / 12. Flat: 0.
    np.testing.assert_allclose(s, [1.0, 1.0, 0.0, 63 / 1023, 0.0], atol=1e-12)
    # images are cropped to whole tiles; noise keeps about (p^2 - 1) / (HW - 1) of its energy
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 35, 35, 3), dtype=np.uint8)
    assert image_statistics(images(*noise), period=8)["grid_energy"].mean() == pytest.approx(63 / 1023, rel=0.1)


def test_jpeg_bits_per_pixel_order_flat_smooth_and_noisy_images():
    flat = solid((90, 90, 90), 64)
    smooth = np.repeat(np.repeat(np.arange(64, dtype=np.uint8)[None, :, None] * 4, 64, 0), 3, 2)
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    s = image_statistics(images(flat, smooth, noisy), period=8)["jpeg_bpp"]
    assert s[0] < s[1] < s[2]
    assert s[2] == pytest.approx(jpeg_size_kb(to_pil(images(noisy))[0]) * 8000 / 64**2)


def test_drift_is_the_change_of_the_mean_in_step_zero_standard_deviations():
    before = {"brightness": np.array([1.0, 2.0, 3.0]), "ir": np.array([1.0, 2.0, 3.0, np.nan])}
    after = {"brightness": np.array([2.0, 3.0, 4.0]), "ir": np.array([0.0, 1.0, 2.0, 100.0])}
    d = {x.name: x for x in compare(before, after, {"brightness": 0.9, "ir": 0.9}, watched=["ir"])}
    assert d["brightness"].drift == pytest.approx(1.0) and d["brightness"].beyond  # mean 2 -> 3, sd 1
    assert d["ir"].drift == pytest.approx(-1.0) and d["ir"].beyond  # the image without a step-0 value left out
    up = {x.name: x for x in compare(after, before, {"brightness": 0.9, "ir": 0.9}, watched=["ir"])}
    assert up["brightness"].beyond and not up["ir"].beyond  # statistics both ways, a watched reward only down
    assert not compare(before, after, {"brightness": None})[0].beyond  # null: recorded, not bounded
    assert "2 -> 3" in d["brightness"].describe() and "+50.0%" in d["brightness"].describe()
    # step-0 images that all agree: the floor keeps the drift finite
    flat = compare({"b": np.ones(4)}, {"b": np.full(4, 1.01)}, {})[0]
    assert np.isfinite(flat.drift) and flat.drift > 5
    with pytest.raises(ValueError, match="evaluation set changed"):
        compare(before, {"brightness": np.ones(5)}, {})


def test_configured_bounds_replace_the_defaults_key_by_key():
    b = effective_bounds({"brightness": None, "shapes": 0.2}, ["shapes", "clip"])
    assert b["brightness"] is None and b["shapes"] == 0.2 and b["clip"] > 0
    assert all(b[k] == DEFAULT_BOUNDS[k] for k in STATISTICS if k != "brightness")


def test_monitor_reads_step_zero_back_warns_and_records_per_image_values(tmp_path, capsys):
    white = images(*[solid((255, 255, 255))] * 3, solid((250, 250, 250)))
    shapes = white.clone()
    shapes[:, :, 8:20, 8:20] = images(solid((40, 40, 220), 12))[0]  # a blue square on every image
    prompts = ["a blue square"] * 4
    m = DriftMonitor({}, {"verifier": {"type": "shapes"}}, tmp_path, period=8)
    m0 = m.observe(0, shapes, prompts)
    assert set(m0) == {f"monitor/{k}" for k in (*STATISTICS, "verifier")} and not m.beyond
    # a fresh monitor (a resumed run) compares with step 0's file; the square is erased into white
    m = DriftMonitor({}, {"verifier": {"type": "shapes"}}, tmp_path, period=8)
    m2 = m.observe(2, white, prompts)
    beyond = {d.name for d in m.beyond}
    assert {"colour_entropy", "saturation", "brightness", "verifier"} <= beyond
    assert m2["monitor/beyond"] == len(beyond) and m2["monitor/verifier"] < m0["monitor/verifier"]
    err = capsys.readouterr().err
    assert "monitors: step 2: colour_entropy" in err and "beyond its bound" in err
    record = json.loads((tmp_path / "monitors-step-2.json").read_text())
    assert len(record["values"]["colour_entropy"]) == 4 and "colour_entropy" in record["beyond"]
    rows, notes = report_series([{"step": 0, **m0}, {"step": 2, **m2}], m.bounds)
    assert rows[0]["step"] == 2 and rows[0]["drift / bound/colour_entropy"] < -1
    bound = DEFAULT_BOUNDS["colour_entropy"]
    assert any(n.startswith(f"monitors: colour_entropy beyond its bound {bound:g} from step 2") for n in notes)
    # a run begun before the monitors existed has no step-0 file: recorded without drift, and said once
    (tmp_path / "monitors-step-0.json").unlink()
    assert not any(k.endswith("/drift") for k in m.observe(4, white, prompts)) and not m.beyond
    m.observe(6, white, prompts)
    assert capsys.readouterr().err.count("monitors-step-0.json is missing") == 1


def _tiny_cfg(model_dir, out, steps, extra=()):
    from margrpo.rl.config import TrainConfig
    from margrpo.utils.config import load_config

    return load_config(TrainConfig, None, [
        f"model={model_dir}", f"out_dir={out}", f"steps={steps}", "rewards={colour_fraction: 1.0}",
        "algorithm.prompts_per_step=2", "algorithm.group_size=4", "sampling.ar_steps=4", "sampling.diffusion_steps=6",
        "algorithm.head_steps_per_ar_step=2", "optim.lr=3e-3", "eval.every=2", "eval.per_category=2",
        "log.checkpoint_every=1", "log.sample_every=100", "log.tensorboard=false", *extra])


@pytest.mark.parametrize("drift_from", [6, 2])
def test_monitors_stop_returns_to_the_last_evaluation_within_bounds(tiny_model_dir, tmp_path, monkeypatch,
                                                                    drift_from):
    """The plumbing of `monitors.stop` (that the monitors fire on a hacked reward is the hacking test's): the real
    statistics are recorded without bounds, and from step `drift_from` on the monitors report a drift; the run
    stops, the checkpoint of the evaluation before it survives pruning (the trainer keeps only the newest 2, here
    the steps after it) and `--resume` continues from it exactly as a run without the stop."""
    from margrpo.rl.faults import DriftStop
    from margrpo.rl.monitors import Drift
    from margrpo.rl.trainer import Trainer
    from margrpo.utils.checkpoint import latest_checkpoint, list_checkpoints
    from margrpo.utils.metrics import read_metrics

    real = DriftMonitor.observe

    def observe(self, step, images, prompts):
        metrics = real(self, step, images, prompts)
        if step >= drift_from:
            self.drifts = [Drift("brightness", 0.9, 0.5, -7.5, 1.0, watched=False)]
        return metrics

    monkeypatch.setattr(DriftMonitor, "observe", observe)
    stop = ["monitors.stop=true", "monitors.bounds={" + ", ".join(f"{k}: null" for k in STATISTICS) + "}"]
    out = tmp_path / "stop"
    good = drift_from - 2
    with pytest.raises(DriftStop, match=rf"at step {drift_from}, brightness 0.9 -> 0.5.*drift -7.50.*"
                                        rf"step-{good} holds the weights of step {good}.*--resume {out}"):
        Trainer(_tiny_cfg(tiny_model_dir, out, 8, stop), progress=False).run()
    assert latest_checkpoint(out) == out / "checkpoints" / f"step-{good}"
    # the newest 2 (persistence.KEEP_CHECKPOINTS) and the protected one before them; the rest pruned
    assert {p.name for p in list_checkpoints(out)} == {f"step-{good}", f"step-{drift_from - 1}", f"step-{drift_from}"}
    assert (out / "report.png").is_file()

    monkeypatch.setattr(DriftMonitor, "observe", real)  # the user changed what drove the drift
    resumed = Trainer(_tiny_cfg(tiny_model_dir, out, 8, stop), progress=False)
    resumed.run(resume=True)
    plain = Trainer(_tiny_cfg(tiny_model_dir, tmp_path / "plain", 8, stop), progress=False)
    plain.run()
    for a, b in zip(plain.model.mar.parameters(), resumed.model.mar.parameters(), strict=True):
        assert torch.equal(a, b)
    drop = ("time/", "memory/")
    assert ([{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(out)]
            == [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / "plain")])


HACK = ["steps=20", "eval.every=5", "eval.per_category=32", "algorithm.prompts_per_step=2", "algorithm.group_size=8",
        "algorithm.ptx_batch_size=16", "optim.lr=3e-4", "log.sample_every=1000", "log.checkpoint_every=1000",
        "log.tensorboard=false", "threads=1",
        # the demo's recipe when the bounds were calibrated (docs/findings/2026-12-07-reward-hacking-monitors.md),
        # before it moved to temperature 0.5 with every unknown token scored; categories drawn per prompt. Later
        # changes moved its figures (the base's step-0 accuracy 28.1% -> 36.7% on the new evaluation sets)
        "sampling.temperature=1.0", "algorithm.policy_tokens=consistent", "prompts.category_balance=random"]


def _monitored_run(out, reward: str, seed: int, extra=()) -> list[dict]:
    from margrpo.configs import config_path
    from margrpo.rl.config import TrainConfig
    from margrpo.rl.trainer import Trainer
    from margrpo.utils.config import load_config
    from margrpo.utils.metrics import read_metrics

    cfg = load_config(TrainConfig, config_path("demo.yaml"),
                      [f"out_dir={out}", f"seed={seed}", f"rewards={{{reward}: 1.0}}", *HACK, *extra])
    Trainer(cfg, progress=False).run()
    return [r for r in read_metrics(out) if "monitor/brightness" in r]


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_monitors_fire_on_a_hacked_reward_and_not_on_the_verifier(seed, tmp_path, capsys):
    """The hacking test (docs/failures.md, "Reward hacking"), with the default bounds: the demo's former recipe
    (temperature 1, consistency selection) at 6x its learning rate with a quarter of its batch on the shipped base,
    20 steps, evaluated every 5 on 128 held-out images. Trained on the `colour_fraction` control reward (easy to
    hack: paint the picture red), the images turn red-orange: brightness falls and colour entropy (a white
    background with a few flat shapes has little) rises beyond their bounds, saturation rises further than in the
    verifier run, and the held-out shapes score, watched and never trained on, falls. The shapes-verifier run of
    the same length stays inside every bound (docs/findings/2026-12-07-reward-hacking-monitors.md has each seed's
    figures).
    """
    hacked = _monitored_run(tmp_path / "hacked", "colour_fraction", seed, ["monitors.watch={shapes: {}}"])
    warnings = capsys.readouterr().err
    first = next((r["step"] for r in hacked if r.get("monitor/beyond", 0) > 0), None)
    print(f"seed {seed}: colour_fraction: the monitors fire from step {first}; "
          + "; ".join(f"step {r['step']}: " + ", ".join(f"{k[8:-6]} {v:+.2f}" for k, v in r.items()
                                                        if k.endswith("/drift")) for r in hacked[1:]))
    assert first is not None, f"the monitors did not fire: {hacked}"
    for name, sign in (("brightness", -1), ("colour_entropy", 1)):
        worst = max(sign * r[f"monitor/{name}/drift"] for r in hacked[1:])
        assert worst > DEFAULT_BOUNDS[name], f"{name} stayed within its bound: {hacked}"
        assert f": {name} " in warnings
    # saturation moves with them, beyond its bound on seed 0 only (+0.71; seeds 1 and 2: +0.43, +0.46 at most)
    assert max(r["monitor/saturation/drift"] for r in hacked[1:]) > DEFAULT_BOUNDS["saturation"] / 2, hacked
    end = hacked[-1]
    assert end["monitor/shapes/drift"] < 0 and end["eval/heldout/strict"] < hacked[0]["eval/heldout/strict"]

    verifier = _monitored_run(tmp_path / "verifier", "shapes", seed)
    worst = max(abs(v) for r in verifier for k, v in r.items() if k.endswith("/drift"))
    print(f"seed {seed}: shapes verifier: the largest |drift| {worst:.2f}")
    assert all(r.get("monitor/beyond", 0) == 0 for r in verifier), verifier
    assert (max(r["monitor/saturation/drift"] for r in hacked[1:])
            > max(abs(r["monitor/saturation/drift"]) for r in verifier[1:])), (hacked, verifier)
