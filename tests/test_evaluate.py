"""Held-out evaluation statistics on hand-worked results (no sampling)."""

import math

import pytest
import torch

from margrpo.experiments.demo import comparison_table
from margrpo.worlds import shapes
from margrpo.worlds.shapes.evaluate import EvalResult, paired_strict_change


def result(prompts: list[str], cats: list[str], strict: list[int]) -> EvalResult:
    rows = [{"category": c, "strict": bool(s), "partial": float(s)} for c, s in zip(cats, strict, strict=True)]
    return EvalResult(prompts=prompts, results=rows, summary=shapes.summarize(rows),
                      images=torch.zeros(len(rows), 3, 2, 2), seconds=0.0)


def test_paired_strict_change_hand_worked():
    prompts = ["p0", "p1", "p2", "p3", "q0", "q1"]
    cats = ["single"] * 4 + ["counting"] * 2
    before = result(prompts, cats, [1, 0, 0, 1, 0, 0])
    after = result(prompts, cats, [1, 1, 0, 0, 1, 1])
    ch = paired_strict_change(before, after)
    # single: differences 0, +1, 0, -1 -> mean 0, sample std sqrt(2/3), s.e. sqrt(2/3)/2
    assert ch["single"][0] == 0.0 and ch["single"][1] == pytest.approx(math.sqrt(2 / 3) / 2)
    # counting: +1, +1 -> mean 1, no spread
    assert ch["counting"] == (1.0, 0.0)
    # overall = mean of category changes, s.e. = sqrt(sum of variances) / number of categories
    assert ch["overall"][0] == pytest.approx(0.5)
    assert ch["overall"][1] == pytest.approx(math.sqrt(2 / 3) / 2 / 2)
    assert ch["overall"][0] == pytest.approx(after.summary["overall"]["strict"] - before.summary["overall"]["strict"])
    table = comparison_table(before, after)
    assert "| counting | 2 | 0.0% | 100.0% | +100.0 ± 0.0 |" in table
    assert "| overall | 6 | 25.0% | 75.0% | +50.0 ± 20.4 |" in table


def test_paired_strict_change_refuses_unpaired_results():
    a = result(["p0", "p1"], ["single", "single"], [1, 0])
    b = result(["p1", "p0"], ["single", "single"], [1, 0])
    with pytest.raises(ValueError, match="same prompts"):
        paired_strict_change(a, b)
    one = result(["p0"], ["single"], [1])
    assert math.isnan(paired_strict_change(one, one)["single"][1])  # one image: no standard error


def test_paired_strict_change_treats_images_of_one_prompt_as_correlated():
    # two prompts, two images each: differences (1, 1) and (0, 0); mean 0.5. Cluster sums 2 and 0, each
    # 2 x 0.5 = 1 from expected: Var = C / (C - 1) x ((2 - 1)^2 + (0 - 1)^2) / N^2 = 2 x 2 / 16 = 0.25.
    # Treated as 4 independent images the s.e. would be std(1, 1, 0, 0) / 2 = 0.289.
    prompts, cats = ["a", "a", "b", "b"], ["single"] * 4
    ch = paired_strict_change(result(prompts, cats, [0, 0, 0, 0]), result(prompts, cats, [1, 1, 0, 0]))
    assert ch["single"] == (0.5, pytest.approx(0.5))
    one_prompt = paired_strict_change(result(["a", "a"], cats[:2], [0, 0]), result(["a", "a"], cats[:2], [1, 0]))
    assert math.isnan(one_prompt["single"][1])  # one cluster: no standard error


def test_eval_curve_table_hand_worked():
    from margrpo.experiments.demo import eval_curve_table

    rows = [{"step": 0, "eval/heldout/strict": 0.25},
            {"step": 3, "loss/kl": 0.1},  # a training row without an evaluation is not a table row
            {"step": 200, "eval/heldout/strict": 0.30, "eval/heldout/strict_change": 0.05,
             "eval/heldout/strict_change_se": 0.012, "eval_ema/heldout/strict": 0.28,
             "eval_ema/heldout/strict_change": 0.03, "eval_ema/heldout/strict_change_se": 0.01}]
    assert eval_curve_table(rows).splitlines() == [
        "| step | held-out | held-out, EMA |", "|---:|---:|---:|", "| 0 | 25.0% |  |",
        "| 200 | 30.0% (+5.0 ± 1.2) | 28.0% (+3.0 ± 1.0) |"]
