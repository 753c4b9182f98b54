"""Prompt-file loaders: the real published files load completely; bad input fails with file and line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from margrpo.data import PromptFileError, PromptRecord, detect_format, load_prompt_file

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
GENEVAL = PROMPTS_DIR / "flow_grpo_geneval_test_metadata.jsonl"
T2I_R1 = PROMPTS_DIR / "t2i_r1_geneval_and_t2i_train.jsonl"

needs_files = pytest.mark.skipif(
    not PROMPTS_DIR.is_dir(), reason=f"shared prompt files not present at {PROMPTS_DIR}"
)


def _raw_records(path: Path) -> list[dict]:
    """Independent reading: every non-blank line is one JSON object."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# The README's row counts (2,211 and 7,222) are `wc -l` counts: neither file ends in a newline, so
# each holds one more record than it has newline characters. GenEval's metadata is its 553 prompts
# four times over (553 x 4 = 2,212).
@needs_files
@pytest.mark.parametrize(
    ("path", "fmt", "newlines", "records", "categories"),
    [
        (
            GENEVAL,
            "geneval",
            2211,
            2212,
            {
                "color_attr": 400,
                "position": 400,
                "two_object": 396,
                "colors": 376,
                "counting": 320,
                "single_object": 320,
            },
        ),
        (
            T2I_R1,
            "t2i_r1",
            7222,
            7223,
            {
                "spatial": 2195,
                "numeracy": 1172,
                "color": 879,
                "complex": 700,
                "non": 700,
                "texture": 695,
                "shape": 682,
                "object": 200,
            },
        ),
    ],
)
def test_real_files_load_completely(
    path: Path, fmt: str, newlines: int, records: int, categories: dict[str, int]
) -> None:
    data = path.read_bytes()
    assert data.count(b"\n") == newlines and not data.endswith(b"\n")
    assert detect_format(path) == fmt
    recs = load_prompt_file(path)
    assert len(recs) == records
    assert Counter(r.category for r in recs) == categories
    raw = _raw_records(path)
    key = "tag" if fmt == "geneval" else "task_type"
    assert Counter(r[key] for r in raw) == categories
    for i, (rec, original) in enumerate(zip(recs, raw, strict=True)):
        assert rec.prompt == original["prompt"]
        assert {"prompt": rec.prompt, **rec.metadata} == original
        assert rec.source == f"{path}:{i + 1}"
    assert load_prompt_file(path, format=fmt) == recs


@needs_files
def test_real_geneval_metadata_has_the_structure_the_loader_checks() -> None:
    recs = load_prompt_file(GENEVAL)
    pos = [r for r in recs if r.category == "position"]
    assert all(any("position" in item for item in r.metadata["include"]) for r in pos)
    counting = [r for r in recs if r.category == "counting"]
    assert all("exclude" in r.metadata for r in counting)
    assert sum("exclude" in r.metadata for r in recs) == len(counting) == 320


def _write(tmp_path: Path, text: str, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_text_files_skip_comments_and_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "# my prompts\n\na red circle\n   \n  two blue squares  \n# end\n", "p.txt")
    assert detect_format(path) == "text"
    assert load_prompt_file(path) == [
        PromptRecord("a red circle", "text", {}, f"{path}:3"),
        PromptRecord("two blue squares", "text", {}, f"{path}:5"),
    ]


def test_generic_jsonl_and_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"prompt": "a cat", "category": "animals", "seed": 3}\n\n{"prompt": "a dog"}\n')
    recs = load_prompt_file(path)
    assert [(r.prompt, r.category, r.metadata, r.source) for r in recs] == [
        ("a cat", "animals", {"category": "animals", "seed": 3}, f"{path}:1"),
        ("a dog", "jsonl", {}, f"{path}:3"),
    ]


def test_empty_file_gives_no_records(tmp_path: Path) -> None:
    assert load_prompt_file(_write(tmp_path, "\n\n")) == []


GOOD_GENEVAL = (
    '{"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"}'
)
GOOD_T2I = json.dumps(
    {
        "prompt": "a photo of four coasters",
        "nouns": ["coaster"],
        "task_type": "numeracy",
        "numeracy_info": [{"obj_name": "coaster", "num": 4}],
    }
)


@pytest.mark.parametrize(
    ("bad_line", "must_mention"),
    [
        ('{"tag": "single_object", "include": [', ["malformed JSON"]),
        ('{"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}', ["'prompt'"]),
        (
            '{"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": 7}',
            ["'prompt'", "int"],
        ),
        (
            '{"tag": "shapes", "include": [{"class": "bowl", "count": 1}], "prompt": "x"}',
            ["'shapes'", "single_object", "color_attr"],
        ),
        (
            '{"tag": "counting", "include": [{"class": "bowl", "count": "2"}], "prompt": "x"}',
            ["include[0]", "'count'", "integer >= 1", "'2'"],
        ),
        ('{"tag": "counting", "include": [{"count": 2}], "prompt": "x"}', ["include[0]", "'class'"]),
        (
            '{"tag": "position", "include": [{"class": "a", "count": 1}, '
            '{"class": "b", "count": 1, "position": ["near", 0]}], "prompt": "x"}',
            ["include[1]", "'position'", "left of"],
        ),
        ('{"tag": "counting", "include": {"class": "a"}, "prompt": "x"}', ["'include'", "list"]),
        ('["a photo of a bowl"]', ["JSON object", "list"]),
    ],
)
def test_malformed_geneval_lines_name_file_line_and_key(
    tmp_path: Path, bad_line: str, must_mention: list[str]
) -> None:
    path = _write(tmp_path, f"{GOOD_GENEVAL}\n\n{bad_line}\n{GOOD_GENEVAL}\n")
    with pytest.raises(PromptFileError) as err:
        load_prompt_file(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    for m in must_mention:
        assert m in msg, (m, msg)


@pytest.mark.parametrize(
    ("bad_line", "must_mention"),
    [
        ('{"prompt": "x", "task_type": "spatial"}', ["'nouns'"]),
        ('{"prompt": "x", "task_type": "", "nouns": []}', ["'task_type'", "non-empty string"]),
        ('{"prompt": "x", "task_type": "spatial", "nouns": ["a", 3]}', ["nouns[1]", "string"]),
        (
            '{"prompt": "x", "task_type": "spatial", "nouns": ["a"], '
            '"spatial_info": {"obj1": "a", "obj2": "b"}}',
            ["spatial_info", "'locality'"],
        ),
        (
            '{"prompt": "x", "task_type": "numeracy", "nouns": ["a"], '
            '"numeracy_info": [{"obj_name": "a", "num": 2.5}]}',
            ["numeracy_info[0]", "'num'", "integer"],
        ),
    ],
)
def test_malformed_t2i_lines_name_file_line_and_key(
    tmp_path: Path, bad_line: str, must_mention: list[str]
) -> None:
    path = _write(tmp_path, f"{GOOD_T2I}\n{bad_line}\n")
    with pytest.raises(PromptFileError) as err:
        load_prompt_file(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: "), msg
    for m in must_mention:
        assert m in msg, (m, msg)


def test_format_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: auto, geneval, t2i_r1, jsonl, text"):
        load_prompt_file(_write(tmp_path, "x\n", "a.txt"), format="csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_file(tmp_path / "nope.jsonl")
    with pytest.raises(PromptFileError, match=r":2: cannot tell the format from keys \['text'\]"):
        load_prompt_file(_write(tmp_path, '\n{"text": "a cat"}\n'))
    with pytest.raises(PromptFileError, match=":1: looks like a JSON array"):
        load_prompt_file(_write(tmp_path, '[{"prompt": "a cat"}]\n'))
    latin1 = tmp_path / "l1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompt_file(latin1)
    # A forced format applies to every line: a text file read as geneval fails on its first line.
    with pytest.raises(PromptFileError, match=":1: malformed JSON"):
        load_prompt_file(_write(tmp_path, "a red circle\n", "b.txt"), format="geneval")
