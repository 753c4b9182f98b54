"""GenEval's rules and T2I-R1's detector rules on hand-made detections, against hand-worked outcomes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from margrpo.rewards.geneval_rules import (
    DetectedObject,
    GenevalRules,
    box_iou,
    colour_requests,
    evaluate,
    keep_objects,
    relative_position,
)
from margrpo.rewards.t2i_r1_rules import (
    nms,
    numeracy_score,
    object_score,
    position_score,
    score_record,
    spatial_score,
)


def obj(label, box, score=1.0, colour=None):
    return DetectedObject(label=label, box=tuple(float(v) for v in box), score=score, colour=colour)


# ------------------------------------------------------------------------------------------------ GenEval: stage 1
def test_box_iou_uses_genevals_inclusive_pixels():
    # 10 x 10 pixels each (0..9), overlap 5 x 10 = 50: 50 / (100 + 100 - 50)
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_keep_objects_thresholds_orders_limits_and_counting_uses_its_own_threshold():
    objs = [obj("cat", (0, 0, 9, 9), 0.5), obj("cat", (50, 0, 59, 9), 0.95), obj("cat", (80, 0, 89, 9), 0.3),
            obj("dog", (0, 50, 9, 59), 0.2)]
    kept = keep_objects(objs, "two_object")
    assert [o.score for o in kept["cat"]] == [0.95, 0.5]  # most confident first; 0.3 is not above 0.3
    assert "dog" not in kept  # a class with nothing kept is absent
    assert [o.score for o in keep_objects(objs, "counting")["cat"]] == [0.95]  # counting: above 0.9
    many = [obj("cup", (10 * i, 0, 10 * i + 5, 5), 0.5 + i / 100) for i in range(20)]
    assert len(keep_objects(many, "single_object")["cup"]) == 16  # max_objects
    assert len(keep_objects(many, "single_object", GenevalRules(max_objects=3))["cup"]) == 3


def test_keep_objects_suppresses_duplicates_only_when_max_overlap_is_below_one():
    # IoU of the two boxes: 1/3 by the inclusive-pixel rule
    objs = [obj("cat", (0, 0, 9, 9), 0.9), obj("cat", (5, 0, 14, 9), 0.8), obj("cat", (40, 0, 49, 9), 0.7)]
    assert len(keep_objects(objs, "x")["cat"]) == 3  # GenEval's default: no suppression
    assert [o.score for o in keep_objects(objs, "x", GenevalRules(max_overlap=0.3))["cat"]] == [0.9, 0.7]
    assert len(keep_objects(objs, "x", GenevalRules(max_overlap=0.34))["cat"]) == 3  # 1/3 < 0.34 is kept


def test_equal_scores_keep_the_detectors_order():
    objs = [obj("circle", (0, 0, 4, 4), 1.0, "red"), obj("circle", (10, 0, 14, 4), 1.0, "blue")]
    assert [o.colour for o in keep_objects(objs, "colors")["circle"]] == ["red", "blue"]


# ------------------------------------------------------------------------------------------------ position
def test_relative_position_by_hand_including_the_margin():
    a, b = (0, 0, 10, 10), (20, 0, 30, 10)  # offset (-20, 0), extents 10 + 10 on each axis
    assert relative_position(a, b) == {"left of"}  # (-20 + 2) / 20 = -0.9
    assert relative_position(b, a) == {"right of"}
    # offset (-3, 0): without the margin -1 (left of); with c = 0.1: (-3 + 2) / 3 = -1/3, no relation
    near = (3, 0, 13, 10)
    assert relative_position(a, near, margin=0.0) == {"left of"}
    assert relative_position(a, near) == set()
    # offset (-10, -8): shrunk to (-8, -6), over |(-10, -8)| = 12.81: dx = -0.625, dy = -0.468: left only
    assert relative_position((0, 0, 10, 10), (10, 8, 20, 18)) == {"left of"}
    # offset (-10, -10): (-8, -8) / 14.14 = -0.566 on both axes: left of and above
    assert relative_position((0, 0, 10, 10), (10, 10, 20, 20)) == {"left of", "above"}
    # offsets inside the margin on both axes: no relation at all
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()


# ------------------------------------------------------------------------------------------------ GenEval: stage 2
POSITION = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["right of", 0]}]}


def test_position_rule_pass_and_flow_grpos_failed_position_terms():
    laptop = obj("laptop", (0, 0, 10, 10))
    good = evaluate(keep_objects([laptop, obj("cow", (30, 0, 40, 10))], "position"), POSITION)
    assert (good.correct, good.exact, good.score) == (True, True, 1.0)  # terms [1, 1, 1]
    bad = evaluate(keep_objects([obj("laptop", (30, 0, 40, 10)), obj("cow", (0, 0, 10, 10))], "position"), POSITION)
    # terms: laptop count 1, cow count 1, position 0 and then Flow-GRPO's unconditional 1: 3 / 4
    assert (bad.correct, bad.exact, bad.score) == (False, False, 0.75)
    assert "expected cow right of target" in bad.reasons[0]
    # the margin: cow 3 px right of the laptop's centre is no relation
    close = evaluate(keep_objects([laptop, obj("cow", (3, 0, 13, 10))], "position"), POSITION)
    assert not close.correct and close.score == 0.75
    # target not matched: no laptop -> laptop term 0, cow term 1, position 0 (no trailing 1): 1 / 3
    lonely = evaluate(keep_objects([obj("cow", (30, 0, 40, 10))], "position"), POSITION)
    assert not lonely.correct and lonely.reasons == ["expected laptop>=1, found 0", "no target for cow to be right of"]
    assert lonely.score == pytest.approx(1 / 3)


def test_counting_at_least_for_genevals_include_exactly_through_exclude_and_flow_grpo_exact():
    meta = {"tag": "counting", "include": [{"class": "wine glass", "count": 2}],
            "exclude": [{"class": "wine glass", "count": 3}]}
    glasses = [obj("wine glass", (20 * i, 0, 20 * i + 9, 9), 0.95) for i in range(4)]
    two = evaluate(keep_objects(glasses[:2], "counting"), meta)
    assert (two.correct, two.exact, two.score) == (True, True, 1.0)
    three = evaluate(keep_objects(glasses[:3], "counting"), meta)
    assert (three.correct, three.exact) == (False, False) and three.score == 0.5  # 1 - |2 - 3| / 2
    assert three.reasons == ["expected wine glass<3, found 3"]
    one = evaluate(keep_objects(glasses[:1], "counting"), meta)
    assert (one.correct, one.exact, one.score) == (False, False, 0.5)
    # below the counting threshold nothing counts
    weak = evaluate(keep_objects([obj("wine glass", (0, 0, 9, 9), 0.8)] * 2, "counting"), meta)
    assert (weak.correct, weak.score) == (False, 0.0)


def test_presence_is_at_least_and_flow_grpos_count_term_is_not_clipped():
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
    three = evaluate(keep_objects([obj("bowl", (20 * i, 0, 20 * i + 9, 9), 0.5) for i in range(3)], "x"), meta)
    assert three.correct and not three.exact
    assert three.score == -1.0  # 1 - |1 - 3| / 1
    none = evaluate({}, meta)
    assert (none.correct, none.exact, none.score) == (False, False, 0.0)


def test_colour_is_read_on_the_most_confident_objects_only():
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}]}
    red_first = keep_objects([obj("cup", (0, 0, 9, 9), 0.8, "red"), obj("cup", (20, 0, 29, 9), 0.5, "purple")], "x")
    r = evaluate(red_first, meta)
    # GenEval: top cup is red -> fails; Flow-GRPO: 2 cups != 1 -> count term 0 and colour term 0
    assert (r.correct, r.exact, r.score) == (False, False, 0.0)
    purple_first = keep_objects([obj("cup", (0, 0, 9, 9), 0.8, "purple"), obj("cup", (20, 0, 29, 9), 0.5, "red")],
                                "x")
    r = evaluate(purple_first, meta)
    assert (r.correct, r.exact, r.score) == (True, False, 0.0)
    pair = {"tag": "colors", "include": [{"class": "apple", "count": 2, "color": "red"}]}
    r = evaluate(keep_objects([obj("apple", (0, 0, 9, 9), 0.9, "red"), obj("apple", (20, 0, 29, 9), 0.8, "green")],
                              "x"), pair)
    assert (r.correct, r.exact, r.score) == (False, False, 0.75)  # terms [1, 1 - |2 - 1| / 2]


def test_colour_requests_name_the_objects_the_rules_read_and_missing_colours_are_an_error():
    meta = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "yellow"},
                                             {"class": "bag", "count": 1}]}
    kept = keep_objects([obj("bus", (0, 0, 9, 9), 0.9), obj("bus", (20, 0, 29, 9), 0.8), obj("bag", (0, 0, 1, 1))],
                        "x")
    assert colour_requests(kept, meta) == [("bus", 0)]
    with pytest.raises(ValueError, match="needs each object's colour"):
        evaluate(kept, meta)


def test_bad_metadata_is_one_clear_error():
    with pytest.raises(ValueError, match="lacks 'include'"):
        evaluate({}, {"tag": "colors"})
    with pytest.raises(ValueError, match=r"include\[0\]\['count'\] must be an integer >= 1"):
        evaluate({}, {"include": [{"class": "cat", "count": 0}]})
    with pytest.raises(ValueError, match="index of an earlier item"):
        evaluate({}, {"include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]})
    with pytest.raises(ValueError, match="max_overlap"):
        GenevalRules(max_overlap=1.5)


def test_shapes_prompts_become_geneval_metadata_as_genevals_own_are_written():
    from margrpo.worlds.shapes import parse_prompt
    from margrpo.worlds.shapes.geneval_bridge import geneval_metadata

    m = geneval_metadata(parse_prompt("a blue square left of a red circle"))
    assert m["tag"] == "position" and m["include"] == [
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}]
    m = geneval_metadata(parse_prompt("three yellow circles"))
    assert m["include"] == [{"class": "circle", "count": 3, "color": "yellow"}]
    assert m["exclude"] == [{"class": "circle", "count": 4}] and m["tag"] == "counting"
    assert geneval_metadata(parse_prompt("a green triangle"))["tag"] == "colors"


def test_shapes_detector_drives_the_rules_like_the_verifier_on_rendered_scenes():
    from margrpo.worlds.shapes import render_scene
    from margrpo.worlds.shapes.geneval_agreement import agreement_table, score_both

    rng = np.random.default_rng(0)
    prompts = ["a red circle", "a blue square and a green triangle", "two yellow circles",
               "a purple triangle above an orange square"]
    images = [render_scene(p, rng) for p in prompts]
    rows = score_both(images + images, prompts + prompts[1:] + prompts[:1])
    assert [r["strict"] for r in rows[:4]] == [True] * 4 and [r["correct"] for r in rows[:4]] == [True] * 4
    assert [r["exact"] for r in rows[4:]] == [False] * 4  # each scene against another category's prompt
    assert agreement_table(rows)["all"]["agree_exact"] == 1.0


# ------------------------------------------------------------------------------------------------ T2I-R1 rules
def test_t2i_r1_position_by_hand_and_where_it_differs_from_the_release():
    left, right = (0.0, 0.0, 0.2, 0.2), (0.5, 0.0, 0.7, 0.2)
    assert position_score("left of", left, right) == 1.0 and position_score("on the left of", left, right) == 1.0
    assert position_score("right of", left, right) == 0.0 and position_score("right of", right, left) == 1.0
    # overlapping boxes: centres 0.2 and 0.4 apart on x, IoU = 0.08 / 0.24 = 1/3 -> 0.1 / (1/3) = 0.3
    assert position_score("left of", (0.0, 0.0, 0.4, 0.4), (0.2, 0.0, 0.6, 0.4)) == pytest.approx(0.3)
    top, bottom = (0.0, 0.0, 0.2, 0.2), (0.0, 0.5, 0.2, 0.7)
    assert position_score("on the top of", top, bottom) == 1.0
    assert position_score("above", top, bottom) == 1.0  # the release scores "above" 0 (no branch for it)
    assert position_score("on top of", top, bottom) == 1.0
    assert position_score("below", bottom, top) == 1.0 and position_score("below", top, bottom) == 0.0
    # the dominant axis decides: mostly vertical offset is not "left of"
    assert position_score("left of", (0.0, 0.0, 0.1, 0.1), (0.1, 0.5, 0.2, 0.6)) == 0.0
    assert position_score("near", left, (0.9, 0.9, 1.0, 1.0)) == 1.0
    assert position_score("behind", left, right) == 0.0


def test_t2i_r1_spatial_presence_top_box_and_the_09_ceiling():
    info = {"obj1": "car", "obj2": "zebra", "locality": "left of"}
    nouns = ["car", "zebra"]
    car, zebra = obj("car", (0.0, 0.0, 0.2, 0.2), 0.6), obj("zebra", (0.5, 0.0, 0.7, 0.2), 0.5)
    assert spatial_score([[car], [zebra]], nouns, info) == pytest.approx(0.9)
    assert spatial_score([[car], []], nouns, info) == pytest.approx(0.2)
    assert spatial_score([[], []], nouns, info) == 0.0
    # a more confident car on the far right represents the car: position fails
    far = obj("car", (0.8, 0.0, 1.0, 0.2), 0.9)
    assert spatial_score([[car, far], [zebra]], nouns, info) == pytest.approx(0.4)


def test_t2i_r1_numeracy_suppresses_duplicates_at_iou_half_on_corner_boxes():
    a = obj("apple", (0.0, 0.0, 0.2, 0.2), 0.9)
    dup = obj("apple", (0.01, 0.0, 0.21, 0.2), 0.8)  # IoU 0.19 / 0.21 = 0.905 with a
    b = obj("apple", (0.5, 0.5, 0.7, 0.7), 0.7)
    assert len(nms([a, dup, b])) == 2
    nouns = ["apple", "dog"]
    info = [{"obj_name": "apple", "num": 2}, {"obj_name": "dog", "num": 1}]
    # apples: 2 after NMS (right: 0.5); dogs: none (0)
    assert numeracy_score([[a, dup, b], []], nouns, info) == pytest.approx(0.5)
    # apples: 1 (wrong: 0.2 x 0.5); dogs: 1 (right: 0.5)
    dog = obj("dog", (0.3, 0.3, 0.4, 0.4), 0.5)
    assert numeracy_score([[a, dup], [dog]], nouns, info) == pytest.approx(0.6)


def test_t2i_r1_object_score_and_record_dispatch():
    nouns = ["cat", "hat", "mat"]
    found = [[obj("cat", (0, 0, 1, 1))], [], [obj("mat", (0, 0, 1, 1))]]
    assert object_score(found, nouns) == pytest.approx(2 / 3)
    assert score_record(found, {"task_type": "color", "nouns": nouns}) == pytest.approx(2 / 3)
    assert score_record([], {"task_type": "non", "nouns": []}) == 1.0
    with pytest.raises(ValueError, match="spatial_info"):
        score_record([[], []], {"task_type": "spatial", "nouns": ["a", "b"]})
    with pytest.raises(ValueError, match="detections for 1 phrases but the record has 2 nouns"):
        score_record([[]], {"task_type": "object", "nouns": ["a", "b"]})
    assert math.isclose(score_record([[obj("a", (0, 0, 0.1, 0.1))]],
                                     {"task_type": "numeracy", "nouns": ["a"],
                                      "numeracy_info": [{"obj_name": "a", "num": 1}]}), 1.0)


def test_each_disagreement_class_of_the_finding_on_drawn_scenes():
    """The three classes of docs/findings/2026-12-07-geneval-rules-on-shapes.md, one hand-drawn scene each."""
    from margrpo.worlds.shapes import SceneObject, draw_scene
    from margrpo.worlds.shapes.geneval_agreement import disagreement_class, score_both

    scenes = {
        # A: two circles in the right places; GenEval's two "circle" items read the same (largest) circle
        "a red circle left of a blue circle": [SceneObject("circle", "red", 8, 16, 10),
                                               SceneObject("circle", "blue", 24, 16, 8)],
        # B: the asked green triangle and a smaller blue one
        "a green triangle": [SceneObject("triangle", "green", 9, 16, 11), SceneObject("triangle", "blue", 24, 16, 8)],
        # C: two blue circles where one is asked for
        "a blue circle and a red triangle": [SceneObject("circle", "blue", 7, 8, 8),
                                             SceneObject("circle", "blue", 24, 8, 8),
                                             SceneObject("triangle", "red", 16, 24, 10)],
    }
    rows = score_both([draw_scene(objs) for objs in scenes.values()], list(scenes))
    a, b, c = rows
    assert (a["strict"], a["correct"], a["exact"], a["partial"]) == (True, False, False, 0.0)
    assert disagreement_class(a, "correct").startswith("verifier passes: the two named objects share a shape")
    assert (b["strict"], b["correct"], b["exact"]) == (False, True, False)
    assert disagreement_class(b, "correct").startswith("GenEval passes: a named shape also in another colour")
    assert disagreement_class(b, "exact") is None
    assert (c["strict"], c["correct"], c["exact"]) == (False, True, False)
    assert disagreement_class(c, "correct").startswith("GenEval passes: more objects of a named kind")
