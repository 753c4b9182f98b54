"""Property-based tests: whatever the bytes, the prompt-file, config and reward-request parsers either parse or raise
their one documented error, whose message names where (file and line, key); never a stray exception type."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from margrpo.data.prompt_files import PromptFileError, load_prompt_file
from margrpo.rewards.remote.schema import Limits, SchemaError, parse_score_request
from margrpo.rl.config import TrainConfig
from margrpo.utils.config import ConfigError, load_config

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)
geneval_like = st.fixed_dictionaries({"tag": st.sampled_from(["single_object", "two_object", "counting", "colors",
                                                              "position", "color_attr", "bogus"]),
                                      "include": st.lists(st.dictionaries(st.sampled_from(["class", "count", "color",
                                                                                           "position"]),
                                                                          json_values, max_size=4), max_size=3),
                                      "prompt": st.text(max_size=30) | st.integers()})


@SETTINGS
@given(lines=st.lists(st.one_of(st.text(max_size=60), json_values.map(json.dumps), geneval_like.map(json.dumps)),
                      max_size=6),
       suffix=st.sampled_from([".jsonl", ".txt", ".json"]))
def test_prompt_files_parse_or_name_the_file_and_line(tmp_path_factory, lines, suffix):
    path = tmp_path_factory.mktemp("p") / f"prompts{suffix}"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        records = load_prompt_file(path)
    except PromptFileError as e:
        assert str(path) in str(e)
    else:
        assert all(isinstance(r.prompt, str) and r.prompt.strip() for r in records)


@SETTINGS
@given(doc=st.dictionaries(st.sampled_from(["steps", "seed", "algorithm", "optim", "sampling", "rewards", "bogus",
                                            "model", "eval", "faults"]), json_values, max_size=5))
def test_configs_load_or_raise_one_config_error(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("c") / "cfg.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    try:
        cfg = load_config(TrainConfig, path, [])
    except ConfigError as e:
        assert str(path) in str(e) or "override" in str(e)
    else:
        assert isinstance(cfg, TrainConfig)


@SETTINGS
@given(obj=json_values | st.fixed_dictionaries({"version": st.integers(0, 2), "reward": st.text(max_size=6),
                                                "images": st.lists(st.text(max_size=12), max_size=3),
                                                "prompts": st.lists(st.text(max_size=12), max_size=3)}))
def test_reward_requests_parse_or_raise_a_schema_error(obj):
    try:
        parse_score_request(obj, Limits(), ["shapes"])
    except SchemaError as e:
        assert e.args and str(e)
