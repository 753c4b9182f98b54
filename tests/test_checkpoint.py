"""Checkpoints: atomic under a crash mid-save, exact optimizer round-trip, safe loading of .pth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from margrpo.utils import checkpoint as ckpt
from margrpo.utils import tensor_state
from margrpo.utils.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from margrpo.utils.rng import generator_state, make_generator, set_generator_state
from margrpo.utils.safe_load import safe_torch_load
from margrpo.utils.tensor_state import optimizer_state_from_tensors, optimizer_state_to_tensors

torch.set_num_threads(1)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # test-only: builds reproducible weights for the fixture
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, g: torch.Generator) -> None:
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _save(run: Path, step: int, model: torch.nn.Module, **kw: object) -> Path:
    return save_checkpoint(run, step, {"policy": model.state_dict()}, {"data_pos": step * 10}, **kw)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    m = _model()
    g = make_generator(0, "data")
    d = save_checkpoint(
        tmp_path, 5, {"policy": m.state_dict()}, {"rng": {"data": generator_state(g)}, "data_pos": 3}
    )
    assert d == tmp_path / "checkpoints" / "step-5"
    assert sorted(p.name for p in d.iterdir()) == ["policy.safetensors", "state.json"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-5"
    tensors, state = load_checkpoint(tmp_path)
    assert state["step"] == 5 and state["data_pos"] == 3
    for k, v in m.state_dict().items():
        assert torch.equal(tensors["policy"][k], v)
    g2 = set_generator_state(torch.Generator(), state["rng"]["data"])
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=g))
    # a step directory can be loaded directly too, and groups filtered
    t2, _ = load_checkpoint(d, groups=["policy"])
    assert set(t2) == {"policy"}
    with pytest.raises(CheckpointError, match="no tensor group 'optimizer'"):
        load_checkpoint(d, groups=["optimizer"])


def test_tied_and_strided_tensors(tmp_path: Path) -> None:
    w = torch.arange(12.0).reshape(3, 4)
    group = {"a": w, "b": w, "t": w.t(), "row": w[1]}  # shared storage, non-contiguous, a view
    save_checkpoint(tmp_path, 0, {"g": group})
    tensors, _ = load_checkpoint(tmp_path)
    for k, v in group.items():
        assert torch.equal(tensors["g"][k], v)


def test_crash_mid_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model()
    prev = save_checkpoint(tmp_path, 1, {"policy": m.state_dict(), "extra": {"x": torch.ones(2)}}, {"a": 1})
    before = {p.name: p.read_bytes() for p in prev.iterdir()}

    real = ckpt._write_group
    calls = {"n": 0}

    def crashing(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill after the first file")
        real(path, tensors)

    monkeypatch.setattr(ckpt, "_write_group", crashing)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"policy": m.state_dict(), "extra": {"x": torch.zeros(2)}}, {"a": 2})
    assert calls["n"] == 2

    root = tmp_path / "checkpoints"
    assert not (root / "step-2").exists()
    assert (root / "latest").read_text().strip() == "step-1"
    assert latest_checkpoint(tmp_path) == prev
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before
    _, state = load_checkpoint(tmp_path)
    assert state == {"step": 1, "a": 1}


def test_crash_replacing_same_step_keeps_old_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, 3, {"g": {"x": torch.ones(2)}}, {"v": "old"})

    def boom(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_group", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, {"g": {"x": torch.zeros(2)}}, {"v": "new"})
    tensors, state = load_checkpoint(tmp_path)
    assert state["v"] == "old" and torch.equal(tensors["g"]["x"], torch.ones(2))


def test_latest_ignores_tmp_and_falls_back(tmp_path: Path) -> None:
    m = _model()
    _save(tmp_path, 10, m)
    _save(tmp_path, 20, m)
    root = tmp_path / "checkpoints"
    # leftovers of a hard kill: a temp dir with a partial file, and a step dir without state.json
    (root / ".tmp-step-30-abc").mkdir()
    (root / ".tmp-step-30-abc" / "policy.safetensors").write_bytes(b"partial")
    (root / "step-40").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step-20"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-10", "step-20"]

    (root / "latest").write_text("step-99\n")  # points at something gone
    assert latest_checkpoint(tmp_path) == root / "step-20"
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path) == root / "step-20"
    assert latest_checkpoint(root) == root / "step-20"  # the checkpoints folder itself works too
    (root / "latest").write_text("step-10\n")  # the pointer is authoritative when valid
    assert latest_checkpoint(tmp_path) == root / "step-10"

    assert latest_checkpoint(tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "empty")

    _save(tmp_path, 50, m)  # a new save cleans up stale temp dirs
    assert not (root / ".tmp-step-30-abc").exists()


def test_keep_last(tmp_path: Path) -> None:
    m = _model()
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, m, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-4"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())


def test_state_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not JSON-serialisable at key rng\.bad \(= nan"):
        save_checkpoint(tmp_path, 0, {}, {"rng": {"bad": float("nan")}})
    with pytest.raises(CheckpointError, match=r"at key obj \(type object\)"):
        save_checkpoint(tmp_path, 0, {}, {"obj": object()})
    with pytest.raises(CheckpointError, match="invalid checkpoint group name"):
        save_checkpoint(tmp_path, 0, {"../x": {}}, {})
    with pytest.raises(CheckpointError, match="'w' is list, not a tensor"):
        save_checkpoint(tmp_path, 0, {"g": {"w": [1.0]}}, {})
    assert latest_checkpoint(tmp_path) is None  # nothing was written


def test_adamw_roundtrip_exact(tmp_path: Path) -> None:
    g = make_generator(1, "batches")
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True)
    _train_steps(m, opt, 3, g)

    opt_t, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    save_checkpoint(
        tmp_path, 3, {"policy": m.state_dict(), "optimizer": opt_t},
        {"optimizer": opt_meta, "rng": generator_state(g)},
    )
    assert "state.0.exp_avg" in opt_t

    tensors, state = load_checkpoint(tmp_path)
    m2 = _model(seed=123)
    m2.load_state_dict(tensors["policy"])
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.5)
    sd = optimizer_state_from_tensors(tensors["optimizer"], json.loads(json.dumps(state["optimizer"])))
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-2
    g2 = set_generator_state(torch.Generator(), state["rng"])

    _train_steps(m, opt, 2, g)
    _train_steps(m2, opt2, 2, g2)
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_encoding_handles_tuples_int_keys_nonfinite() -> None:
    obj = {"a": (1, 2.5), 3: [torch.tensor([1.0]), None], "inf": float("inf"), "__tensor__": "x"}
    t, meta = tensor_state.state_to_tensors(obj)
    back = tensor_state.state_from_tensors(t, json.loads(json.dumps(meta, allow_nan=False)))
    assert back["a"] == (1, 2.5) and back["inf"] == float("inf") and back["__tensor__"] == "x"
    assert torch.equal(back[3][0], torch.tensor([1.0])) and back[3][1] is None


def test_safe_torch_load(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-last.pth"
    # test-only: write a file the way LTH14/mar does (pickled argparse.Namespace)
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as ei:
        safe_torch_load(path)
    assert str(path) in str(ei.value) and "argparse.Namespace" in str(ei.value)
    obj = safe_torch_load(path, allow=[argparse.Namespace])
    assert torch.equal(obj["model"]["w"], torch.ones(2)) and obj["args"].lr == 0.1

    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(3)}, plain)
    assert torch.equal(safe_torch_load(plain)["w"], torch.zeros(3))


def test_manifest_catches_truncated_corrupted_and_missing_files(tmp_path: Path) -> None:
    m = _model()
    first = _save(tmp_path, 1, m)
    second = _save(tmp_path, 2, m)
    assert ckpt.verify_checkpoint(second) is None
    f = second / "policy.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-7])
    assert "bytes, the manifest says" in ckpt.verify_checkpoint(second)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    f.write_bytes(bytes(flipped))
    assert "SHA-256" in ckpt.verify_checkpoint(second)
    with pytest.raises(CheckpointError, match="policy.safetensors"):
        load_checkpoint(second)
    skipped: list[str] = []
    assert latest_checkpoint(tmp_path, verify=True, skipped=skipped) == first  # the previous complete one
    assert len(skipped) == 1 and "step-2" in skipped[0]
    assert latest_checkpoint(tmp_path) == second  # without verification: what `latest` names
    f.unlink()
    assert "missing" in ckpt.verify_checkpoint(second)


def test_checkpoints_without_a_manifest_still_load(tmp_path: Path) -> None:
    d = _save(tmp_path, 3, _model())
    state = json.loads((d / "state.json").read_text())
    del state["_checkpoint"]["files"]  # as written before manifests existed
    (d / "state.json").write_text(json.dumps(state))
    assert ckpt.verify_checkpoint(d) is None
    tensors, st = load_checkpoint(tmp_path)
    assert st["step"] == 3 and "policy" in tensors


@pytest.mark.parametrize("damage", [
    lambda meta: meta["files"]["policy.safetensors"].pop("bytes"),
    lambda meta: meta.__setitem__("files", ["policy.safetensors"]),
    lambda meta: meta["files"].__setitem__("policy.safetensors", "abc"),
])
def test_a_malformed_manifest_is_damage_not_a_crash(tmp_path: Path, damage) -> None:
    first = _save(tmp_path, 1, _model())
    second = _save(tmp_path, 2, _model())
    state = json.loads((second / "state.json").read_text())
    damage(state["_checkpoint"])
    (second / "state.json").write_text(json.dumps(state))
    assert "malformed checkpoint manifest" in ckpt.verify_checkpoint(second)
    assert latest_checkpoint(tmp_path, verify=True) == first
