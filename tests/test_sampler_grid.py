"""Honest baselines: the sampler grid chooses on training prompts only, its cache key names every input, pass@k
against a count over subsets, and the evaluation sets (hand-worked results; the one sampling test uses a tiny
model)."""

import dataclasses
import itertools
import json
import math
from collections import Counter

import pytest
import torch

from margrpo.sampling.config import SamplerConfig
from margrpo.utils import result_cache
from margrpo.worlds import shapes
from margrpo.worlds.shapes import sampler_grid as sg
from margrpo.worlds.shapes.evaluate import (
    EvalResult,
    EvalSet,
    draw_covering,
    eval_set,
    eval_sets,
    strict_accuracy,
)
from margrpo.worlds.shapes.pass_at_k import category_pass_at_k, pass_at_k


def result(prompts: list[str], cats: list[str], strict: list[int]) -> EvalResult:
    rows = [{"category": c, "strict": bool(s), "partial": float(s)} for c, s in zip(cats, strict, strict=True)]
    return EvalResult(prompts=prompts, results=rows, summary=shapes.summarize(rows), images=None, seconds=0.0)


def two_split_grid() -> sg.SamplerGrid:
    """Setting B is best on training prompts, setting C on held-out ones."""
    settings = sg.grid_settings((1.0, 3.0), (1.0, 0.5))  # A=(1, 1), B=(1, 0.5), C=(3, 1), D=(3, 0.5)
    prompts, cats = ["p", "q", "r", "s"], ["single"] * 4
    train = [result(prompts, cats, v) for v in ([1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0])]
    held = [result(prompts, cats, v) for v in ([0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0])]
    return sg.SamplerGrid(settings, {"train": train, "heldout": held}, {"train": [0.0] * 4, "heldout": [0.0] * 4})


def test_the_grid_chooses_on_training_prompts_never_on_held_out_ones():
    grid = two_split_grid()
    assert grid.chosen() == sg.SamplerSetting(1.0, 0.5)  # held-out would pick (3, 1)
    assert grid.result("heldout", grid.chosen()).summary["overall"]["strict"] == 0.25
    report = grid.report()
    assert "Chosen on training prompts: guidance 1, temperature 0.5; held-out strict accuracy there 25.0%" in report
    assert "| 1 | 0.5 | 75.0% ± 25.0 | 25.0% ± 25.0 | chosen |" in report
    with pytest.raises(ValueError, match="chooses on the 'train' split"):
        sg.SamplerGrid(grid.settings, {"heldout": grid.results["heldout"]}, {"heldout": [0.0] * 4}).chosen()
    tie = [result(["p"], ["single"], [1])] * 2  # a tie goes to the earlier setting of the grid
    assert sg.choose_setting(grid.settings[2:], tie) == grid.settings[2]
    back = sg.SamplerGrid.from_json(json.loads(json.dumps(grid.to_json())))
    assert back.chosen() == grid.chosen() and back.table() == grid.table()


def test_base_at_best_takes_the_held_out_score_at_the_setting_chosen_on_training_prompts(monkeypatch):
    from margrpo.experiments import baselines

    grid = two_split_grid()
    seen = []

    def fake_cached_grid(spec, model, sets, sampler, settings, progress):
        seen.append(set(sets))
        return sg.SamplerGrid(list(settings), {"train": grid.results["train"]}, {"train": [1.0] * 4})

    def fake_evaluate_set(model, s, sampler, progress):
        seen.append((s.split, sampler.guidance_scale, sampler.temperature))
        return grid.results["heldout"][0]

    monkeypatch.setattr(baselines, "cached_grid", fake_cached_grid)
    monkeypatch.setattr(baselines, "evaluate_set", fake_evaluate_set)
    sel, held = EvalSet("train", ("p",), 1), EvalSet("heldout", ("q",), 2)
    best = baselines.base_at_best("shipped:x", None, sel, held, SamplerConfig(), grid.settings, progress=False)
    assert seen == [{"train"}, ("heldout", 1.0, 0.5)]  # the base's grid never samples held-out prompts either
    assert best.setting == sg.SamplerSetting(1.0, 0.5) and best.heldout is grid.results["heldout"][0]

    seen.clear()

    def fake_run_grid(model, sets, sampler, settings, progress):
        seen.append(set(sets))
        return sg.SamplerGrid(list(settings), {"train": grid.results["train"]}, {"train": [1.0] * 4})

    monkeypatch.setattr(baselines, "run_grid", fake_run_grid)
    trained = baselines.trained_at_best(None, sel, held, SamplerConfig(), grid.settings, progress=False)
    assert seen == [{"train"}, ("heldout", 1.0, 0.5)]  # the trained grid never samples held-out prompts
    assert trained.setting == sg.SamplerSetting(1.0, 0.5)


def test_grid_settings_refuse_bad_values():
    assert [(s.guidance_scale, s.temperature) for s in sg.grid_settings((1, 2), (1, 0.5))] == [
        (1.0, 1.0), (1.0, 0.5), (2.0, 1.0), (2.0, 0.5)]
    with pytest.raises(ValueError, match="guidance scale 0.5 is out of range"):
        sg.grid_settings((0.5,), (1.0,))
    with pytest.raises(ValueError, match="repeats a setting"):
        sg.grid_settings((1.0, 1.0), (1.0,))


def test_the_cache_key_changes_when_any_input_changes(monkeypatch):
    sets = eval_sets(2, 1234)
    sampler = SamplerConfig(ar_steps=8, diffusion_steps=10)
    settings = sg.grid_settings((1.0, 2.0), (1.0, 0.5))

    def key(**over):
        args = dict(model_digest="abc", sets=sets, sampler=sampler, settings=settings, device="cpu")
        args.update(over)
        return sg.grid_cache_key(**args)

    base = key()
    assert key() == base and result_cache.key_digest(key()) == result_cache.key_digest(base)
    variants = {
        "model": key(model_digest="abd"),
        "ar steps": key(sampler=dataclasses.replace(sampler, ar_steps=16)),
        "head steps": key(sampler=dataclasses.replace(sampler, diffusion_steps=25)),
        "guidance schedule": key(sampler=dataclasses.replace(sampler, guidance_schedule="constant")),
        "settings": key(settings=sg.grid_settings((1.0, 3.0), (1.0, 0.5))),
        "prompts": key(sets=eval_sets(3, 1234)),
        "seed": key(sets=eval_sets(2, 1235)),
        "image seed": key(sets={**sets, "train": dataclasses.replace(sets["train"], seed=7)}),
        "splits": key(sets={"train": sets["train"]}),
        "device": key(device="meta"),
    }
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    variants["torch version"] = key()
    monkeypatch.undo()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    variants["threads"] = key()
    monkeypatch.undo()
    monkeypatch.setattr(sg, "code_digest", lambda: "other code")
    variants["code"] = key()
    monkeypatch.undo()
    digests = {name: result_cache.key_digest(k) for name, k in variants.items()}
    assert all(d != result_cache.key_digest(base) for d in digests.values()), digests
    assert len(set(digests.values())) == len(digests)
    # the grid's own guidance and temperature are the settings', not the sampler's
    assert key(sampler=dataclasses.replace(sampler, guidance_scale=3.0, temperature=0.5)) == base


def test_model_files_digest_follows_every_byte(tmp_path):
    from margrpo.models.loading import model_files_digest

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    d0 = model_files_digest(str(folder))
    (folder / "model.safetensors").write_bytes(b"\0" * 63 + b"\1")
    d1 = model_files_digest(str(folder))
    (folder / "extra.json").write_text("{}")
    assert len({d0, d1, model_files_digest(str(folder))}) == 3
    assert model_files_digest("shipped:shapes-base") == model_files_digest("shipped:shapes-base")


def test_cached_grid_computes_once_and_a_damaged_entry_is_a_miss(tmp_path, monkeypatch):
    from conftest import tiny_model

    monkeypatch.setenv("MARGRPO_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    calls = []
    real = sg.run_grid
    monkeypatch.setattr(sg, "run_grid", lambda *a, **k: calls.append(1) or real(*a, **k))
    sets = eval_sets(1, 1234)
    sampler = SamplerConfig(ar_steps=2, diffusion_steps=4)
    settings = sg.grid_settings((1.0, 2.0), (1.0,))
    first = sg.cached_grid(str(folder), model, sets, sampler, settings, progress=False)
    second = sg.cached_grid(str(folder), model, sets, sampler, settings, progress=False)
    assert len(calls) == 1 and not first.from_cache and second.from_cache
    assert second.cache_path == first.cache_path and str(tmp_path / "cache") in str(first.cache_path)
    assert [r.results for r in second.results["heldout"]] == [r.to_json()["results"] for r in first.results["heldout"]]
    first.cache_path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        sg.cached_grid(str(folder), model, sets, sampler, settings, progress=False)
    assert len(calls) == 2
    sg.cached_grid(str(folder), model, sets, sampler, settings, progress=False, use_cache=False)
    assert len(calls) == 3


def test_pass_at_k_equals_the_share_of_k_subsets_holding_a_correct_sample():
    for n, c, k in [(6, 2, 3), (5, 0, 2), (5, 5, 1), (8, 1, 8), (7, 3, 1), (6, 4, 3)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets)), (n, c, k)
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    # per category: the mean over prompts, and its s.e. the spread over prompts / sqrt(prompts)
    by_k = category_pass_at_k([[True, False], [False, False], [True, True]], [1, 2])
    assert by_k[1][0] == pytest.approx(0.5) and by_k[2][0] == pytest.approx(2 / 3)
    assert by_k[1][1] == pytest.approx(0.5 / math.sqrt(3))  # values 0.5, 0, 1: std 0.5


def test_draw_covering_hand_worked():
    rng = __import__("numpy").random.default_rng(0)
    assert sorted(Counter(draw_covering(["a", "b", "c"], 7, rng)).values()) == [2, 2, 3]
    four = draw_covering(list("abcdefghij"), 4, rng)
    assert len(set(four)) == 4 and four == sorted(four)  # without replacement, in the pool's order
    assert draw_covering([], 5, rng) == [] and draw_covering(["a"], 0, rng) == []


def test_evaluation_sets_cover_each_category_and_follow_one_seed():
    sets = eval_sets(200, 1234)
    held, train = sets["heldout"], sets["train"]
    cats = Counter(shapes.parse_prompt(p).category for p in held.prompts)
    assert all(cats[c] == 200 for c in shapes.CATEGORIES)
    assert not set(held.prompts) & set(train.prompts)
    position = [p for p in held.prompts if shapes.parse_prompt(p).category == "position"]
    assert len(set(position)) == 200  # 200 of the 284 held-out position prompts, without replacement
    first = Counter(shapes.parse_prompt(p).objects[0].colour for p in position)
    assert len(first) == 6 and min(first.values()) > 10  # every first colour, not the grammar's first ones
    singles = Counter(p for p in held.prompts if shapes.parse_prompt(p).category == "single")
    assert sorted(singles.values()) == [66, 67, 67]  # the 3 held-out single prompts, as even as 200 allows
    assert eval_sets(200, 1234) == sets and eval_set("heldout", 200, 1235).prompts != held.prompts
    assert held.seed != train.seed
    assert set(eval_set("train", 100, 1234).prompts) <= set(train.prompts)  # a smaller draw is a subset
    with pytest.raises(ValueError, match="unknown evaluation split 'test'"):
        eval_set("test", 2)


def test_strict_accuracy_standard_error_is_clustered_by_prompt():
    # single: prompts a (1, 1) and b (0, 0): mean 0.5, Var = 2 / 1 x ((2 - 1)^2 + (0 - 1)^2) / 16 = 0.25
    res = result(["a", "a", "b", "b", "x", "y"], ["single"] * 4 + ["counting"] * 2, [1, 1, 0, 0, 1, 0])
    acc = strict_accuracy(res)
    assert acc["single"] == (0.5, pytest.approx(0.5))
    assert acc["counting"] == (0.5, pytest.approx(0.5))  # two prompts of one image: s / sqrt(2)
    assert acc["overall"] == (0.5, pytest.approx(math.sqrt(0.25 + 0.25) / 2))
    back = EvalResult.from_json(json.loads(json.dumps(res.to_json())))
    assert back.prompts == res.prompts and back.summary == res.summary
    with pytest.raises(ValueError, match="2 prompts but 1 results"):
        EvalResult.from_json({"prompts": ["a", "b"], "results": [{}]})
