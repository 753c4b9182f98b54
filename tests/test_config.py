"""Config loading: YAML + base files + dotted overrides, checked against dataclasses."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from margrpo.configs import CONFIGS
from margrpo.utils.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


class Family(enum.Enum):
    MAR = "mar"
    NOVA = "nova"


@dataclass
class TrainCfg:
    lr: float = field(default=1e-3, metadata={"range": (0.0, 1.0)})
    steps: int = field(default=100, metadata={"range": (1, None)})
    betas: tuple[float, float] = (0.9, 0.999)
    clip: Optional[float] = None  # noqa: UP045 - typing.Optional must keep working
    schedule: str = field(default="cosine", metadata={"choices": ("cosine", "constant")})


@dataclass
class ModelCfg:
    depth: int = 3
    kind: Literal["mar", "nova", "harmon"] = "mar"
    family: Family = Family.MAR


@dataclass
class HeadCfg:
    width: int = 256


@dataclass
class Cfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    head: HeadCfg | None = None
    rewards: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    tags: list[str] = field(default_factory=list)
    name: str | None = "demo"
    flag: bool = False
    seed: int = 0
    out: Path = Path("runs/demo")
    temperature: float = field(default=1.0, metadata={"allow_nonfinite": True})


@dataclass
class Required:
    n: int
    x: float = 0.0


@dataclass
class Checked:
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        if self.lo > self.hi:
            raise ValueError(f"lo ({self.lo}) must not exceed hi ({self.hi})")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    assert load_config(Cfg) == Cfg()


def test_yaml_and_overrides_types(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "train:\n  lr: 3e-4\n  steps: 50\nmodel:\n  depth: 4\n")
    cfg = load_config(
        Cfg,
        f,
        [
            "train.lr=1e-4",
            "rewards={shapes: 1.0, jpeg_compressibility: 0.1}",
            "flag=true",
            "name=null",
            "tags=[a, b]",
            "train.betas=[0.8, 0.9]",
            "model.family=nova",
            "train.clip=1",
            "head.width=64",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 50 and cfg.model.depth == 4
    assert cfg.rewards == {"shapes": 1.0, "jpeg_compressibility": 0.1}
    assert cfg.flag is True and cfg.name is None
    assert cfg.tags == ["a", "b"]
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.model.family is Family.NOVA
    assert cfg.train.clip == 1.0 and isinstance(cfg.train.clip, float)  # int accepted for float
    assert cfg.head == HeadCfg(width=64)  # Optional section created from its defaults


def test_yaml_float_without_dot(tmp_path: Path) -> None:
    # Plain PyYAML reads 3e-4 as a string; ours must read it as a float.
    cfg = load_config(Cfg, _write(tmp_path / "c.yaml", "train:\n  lr: 3e-4\n"))
    assert cfg.train.lr == pytest.approx(3e-4)


def test_str_field_override_keeps_text() -> None:
    assert load_config(Cfg, None, ["name=2024"]).name == "2024"


def test_unknown_key_names_file_line_and_suggestion(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "seed: 1\ntrain:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, f)
    msg = str(ei.value)
    assert f"{f}:4" in msg
    assert "train.lrr" in msg and "did you mean 'train.lr'" in msg
    assert "lr, steps, betas, clip, schedule" in msg  # the valid keys are listed


def test_unknown_key_in_override() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, None, ["trian.lr=1"])
    msg = str(ei.value)
    assert "override 'trian.lr=1'" in msg and "unknown key 'trian'" in msg and "did you mean 'train'" in msg


def test_type_errors_name_key_value_and_type(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "train:\n  steps: 2.5\nflag: maybe\n")
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, f)
    errs = ei.value.errors
    assert len(errs) == 2
    assert any(f"{f}:2" in e and "train.steps" in e and "expected int" in e and "2.5" in e for e in errs)
    assert any(f"{f}:3" in e and "flag" in e and "expected bool" in e and "maybe" in e for e in errs)


def test_range_and_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr = 2\.0 is out of range: must be in \[0\.0, 1\.0\]"):
        load_config(Cfg, None, ["train.lr=2.0"])
    with pytest.raises(ConfigError, match=r"train\.steps = 0 is out of range: must be >= 1"):
        load_config(Cfg, None, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"model\.kind = 'foo' is not one of 'mar', 'nova', 'harmon'"):
        load_config(Cfg, None, ["model.kind=foo"])
    with pytest.raises(ConfigError, match=r"train\.schedule = 'linear' is not one of 'cosine', 'constant'"):
        load_config(Cfg, None, ["train.schedule=linear"])
    with pytest.raises(ConfigError, match=r"model\.family = 'x' is not one of 'mar', 'nova'"):
        load_config(Cfg, None, ["model.family=x"])


def test_nonfinite_rejected_unless_allowed() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr = nan is not a finite number"):
        load_config(Cfg, None, ["train.lr=.nan"])
    assert math.isinf(load_config(Cfg, None, ["temperature=.inf"]).temperature)


def test_tuple_length_and_dict_values() -> None:
    with pytest.raises(ConfigError, match=r"train\.betas: expected 2 items"):
        load_config(Cfg, None, ["train.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"rewards\.shapes: expected float, got str 'high'"):
        load_config(Cfg, None, ["rewards={shapes: high}"])


def test_all_errors_reported_together() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(Cfg, None, ["train.lr=5", "seed=x", "bogus=1"])
    assert len(ei.value.errors) == 3


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Cfg, None, ["train.lr"])
    with pytest.raises(ConfigError, match="cannot parse value"):
        load_config(Cfg, None, ["rewards={shapes: 1.0"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(Cfg, None, ["seed.x=1"])


def test_section_merge_vs_dict_replace(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "train:\n  steps: 7\nrewards:\n  a: 1.0\n  b: 2.0\n")
    cfg = load_config(Cfg, f, ["train={lr: 0.5}", "rewards={c: 3.0}"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5  # dataclass sections merge
    assert cfg.rewards == {"c": 3.0}  # dict fields are replaced whole
    cfg = load_config(Cfg, f, ["rewards.c=3.0"])
    assert cfg.rewards == {"a": 1.0, "b": 2.0, "c": 3.0}


def test_base_files_merge_and_cycle(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "base.yaml", "seed: 3\ntrain:\n  lr: 0.1\n  steps: 10\n")
    child = _write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\ntrain:\n  steps: 20\n")
    cfg = load_config(Cfg, child, ["seed=4"])
    assert (cfg.seed, cfg.train.lr, cfg.train.steps) == (4, 0.1, 20)

    # errors in a base file name the base file and its line
    _write(tmp_path / "base.yaml", "seed: 3\ntrain:\n  lr: 7.0\n")
    with pytest.raises(ConfigError, match=r"base\.yaml:3: train\.lr = 7\.0 is out of range"):
        load_config(Cfg, child)

    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Cfg, a)
    # a list of files is layered in order, each with its own base chain; overrides still come last
    over = _write(tmp_path / "over.yaml", "train:\n  lr: 0.3\n")
    _write(tmp_path / "base.yaml", "seed: 3\ntrain:\n  lr: 0.1\n  steps: 10\n")
    cfg = load_config(Cfg, [child, over], ["seed=5"])
    assert (cfg.seed, cfg.train.lr, cfg.train.steps) == (5, 0.3, 20)
    cfg = load_config(Cfg, [over, child])
    assert (cfg.seed, cfg.train.lr, cfg.train.steps) == (3, 0.1, 20)  # child's base chain re-sets lr
    missing = _write(tmp_path / "m.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"m\.yaml:1: base config 'nowhere\.yaml' not found"):
        load_config(Cfg, missing)


def test_duplicate_key_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml:2: duplicate key 'seed' \(first given at line 1\)"):
        load_config(Cfg, _write(tmp_path / "c.yaml", "seed: 1\nseed: 2\n"))
    with pytest.raises(ConfigError, match=r"d\.yaml: invalid YAML"):
        load_config(Cfg, _write(tmp_path / "d.yaml", "train: [1,\n"))
    with pytest.raises(ConfigError, match="top level of a config file must be a mapping"):
        load_config(Cfg, _write(tmp_path / "e.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_required_fields_and_post_init() -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'n' \(int\)"):
        load_config(Required)
    assert load_config(Required, None, ["n=3"]).n == 3
    with pytest.raises(ConfigError, match=r"lo \(2\.0\) must not exceed hi"):
        load_config(Checked, None, ["lo=2.0"])


def test_save_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(
        Cfg,
        None,
        ["train.lr=1e-5", "name=1e5", "tags=['true', '3']", "head.width=8", "rewards={a: 0.1, b: 2}",
         "model.family=nova", "temperature=.inf", "out=/tmp/x y"],
    )
    assert cfg.name == "1e5" and cfg.tags == ["true", "3"]
    p = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Cfg, p)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_to_dict(cfg)["train"]["betas"] == [0.9, 0.999]


def test_config_from_dict() -> None:
    cfg = config_from_dict(Cfg, {"train": {"lr": 0.2}, "seed": 5})
    assert cfg.train.lr == 0.2 and cfg.seed == 5 and cfg.train.steps == 100
    with pytest.raises(ConfigError, match=r"<dict>: unknown key 'sed'"):
        config_from_dict(Cfg, {"sed": 1})


def test_configuration_docs_are_generated_from_the_dataclasses_and_fresh():
    """docs/configuration.md is `python -m margrpo.rl.config`'s output: regenerate it when an option changes."""
    import dataclasses
    from pathlib import Path

    from margrpo.rl.config import TrainConfig, configuration_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == configuration_markdown(), "stale: run python -m margrpo.rl.config"

    def every_field(cls, prefix=""):
        for f in dataclasses.fields(cls):
            yield prefix + f.name, f
            if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type)
                                                   and dataclasses.is_dataclass(f.default_factory)):
                yield from every_field(f.default_factory, prefix + f.name + ".")

    fields = list(every_field(TrainConfig))
    assert len(fields) > 60 and all(f.metadata.get("help") for _, f in fields), [n for n, f in fields
                                                                               if not f.metadata.get("help")]


def test_a_renamed_key_points_to_its_new_name():
    """Configs written before the renames (sampling.cfg, algorithm.guidance) get the new key in the error."""
    from margrpo.rl.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["sampling.cfg=3.0", "algorithm.guidance=cond_only"])
    assert "it was renamed to 'sampling.guidance_scale'" in str(err.value)
    assert "it was renamed to 'algorithm.score_guidance'" in str(err.value)


def test_a_removed_key_says_why_it_went():
    """Configs that set an option which was removed get what replaced it, not a bare "unknown key"."""
    from margrpo.rl.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["algorithm.chunk_head_steps=1", "algorithm.ratio_level=image"])
    assert "'algorithm.chunk_head_steps'; it was removed: the trajectory loss always" in str(err.value)
    assert "'algorithm.ratio_level'; it was removed: the PPO ratio is taken per element" in str(err.value)


@pytest.mark.parametrize("name", sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")
                                        if p.name != "shapes-pretrain.yaml"))
def test_every_shipped_training_config_loads(name):
    """The shipped configs and presets (the model-family ones included) are valid TrainConfigs."""
    from margrpo.rl.config import TrainConfig

    cfg = load_config(TrainConfig, CONFIGS / name, [])
    assert cfg.steps >= 1


def test_the_nova_config_states_the_papers_settings():
    from margrpo.rl.config import TrainConfig

    cfg = load_config(TrainConfig, CONFIGS / "nova-hps.yaml", [])
    a = cfg.algorithm
    assert (a.group_size, a.head_steps_per_ar_step, a.mte_k, a.mte_top_fraction, a.beta) == (4, 10, 3, 0.3, 0.01)
    assert round(a.ar_step_fraction * 63) == 12  # 12 scored AR steps of NOVA's 63
    assert (cfg.optim.lr, cfg.sampling.guidance_scale, cfg.sampling.guidance_schedule) == (2e-6, 5.0, "constant")
    assert cfg.rewards == {"hpsv2": 1.0} and a.estimator == "trajectory" and a.train == "ar"


def test_the_harmon_config_states_the_papers_settings():
    from margrpo.rl.config import TrainConfig

    cfg = load_config(TrainConfig, CONFIGS / "harmon-hps.yaml", [])
    a = cfg.algorithm
    assert (a.group_size, a.head_steps_per_ar_step, a.mte_k, a.mte_top_fraction, a.beta) == (4, 10, 5, 0.3, 0.01)
    assert round(a.ar_step_fraction * 64) == 12  # 12 scored AR steps of Harmon's 64
    assert (cfg.optim.lr, cfg.sampling.guidance_scale, cfg.sampling.guidance_schedule) == (1e-6, 3.0, "constant")
    assert cfg.rewards == {"hpsv2": 1.0} and a.train == "ar"
