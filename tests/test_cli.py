"""The command line end to end on a tiny model: sample, eval, train, resume, and clear errors."""

import json

import pytest
import torch

from margrpo.cli import main
from margrpo.models.mar.factory import ModelSpec, build_model
from margrpo.utils.metrics import read_metrics
from margrpo.worlds.shapes.pretrain import vocabulary

TINY = ModelSpec(width=32, depth=1, num_heads=2, head_width=32, head_depth=1, diffusion_steps=4, text_dim=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    build_model(TINY, vocabulary()).save_pretrained(path)
    return path


def test_sample_writes_a_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", "--model", str(model_dir), "--prompt", "a red circle", "--prompt", "two blue squares",
               "-n", "2", "--ar-steps", "4", "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
    assert "images/s" in capsys.readouterr().out


def test_eval_prints_a_table_and_writes_json(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", str(model_dir), "--ar-steps", "4", "--per-category", "2", "--json", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| overall | 8 |" in text and "8 held-out images" in text and " ± " in text
    record = json.loads(out.read_text())
    assert "overall" in record["summary"] and record["seed"] == 1234  # the demo's eval.seed: the same images
    assert record["sampler"]["ar_steps"] == 4 and record["sampler"]["diffusion_steps"] == 10  # demo.yaml's


def test_eval_grid_chooses_on_training_prompts_and_caches_the_grid(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MARGRPO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "grid.json"
    args = ["eval", str(model_dir), "--ar-steps", "2", "--diffusion-steps", "4", "--per-category", "1",
            "--guidance-scale", "1", "2", "--temperature", "1", "0.5", "--json", str(out), "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| 2 | 0.5 |" in text and "Chosen on training prompts" in text and "computed in" in text
    record = json.loads(out.read_text())
    grid = record["grid"]
    assert len(grid["settings"]) == 4 and set(grid["results"]) == {"train", "heldout"}
    train = [sum(r["strict"] for r in res["results"]) for res in grid["results"]["train"]]
    assert record["chosen"] == grid["settings"][train.index(max(train))]  # the first best on training prompts
    assert len(list((tmp_path / "cache" / "sampler-grid").glob("*.json"))) == 1
    assert main(args) == 0  # the same grid again: read back from the cache
    assert "read from the result cache" in capsys.readouterr().out
    assert json.loads(out.read_text())["grid"] == grid


def test_eval_pass_at_k_and_bad_flags(model_dir, tmp_path, capsys):
    out = tmp_path / "pk.json"
    assert main(["eval", str(model_dir), "--ar-steps", "2", "--diffusion-steps", "4", "--per-category", "2",
                 "--pass-at-k", "1", "2", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| category | prompts | pass@1 | pass@2 |" in text and "| single | 2 |" in text
    record = json.loads(out.read_text())["pass_at_k"]
    assert record["heldout"]["samples_per_prompt"] == 2 and record["train"]["prompts"]["position"] == 2
    for bad, msg in ((["--per-category", "0"], "--per-category must be at least 1"),
                     (["--pass-at-k", "4", "--samples-per-prompt", "2"], "1 <= k <= samples per prompt"),
                     (["--grid", "--temperature", "0", "1"], "temperature 0.0 is out of range"),
                     (["--config", "nope.yaml"], "no shipped config 'nope.yaml'")):
        assert main(["eval", str(model_dir), "--quiet", *bad]) == 2
        assert msg in capsys.readouterr().err


def test_train_and_resume(model_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model: {model_dir}
out_dir: {tmp_path / 'run'}
steps: 2
rewards: {{random: 1.0}}  # information-free but never tied: every step updates
sampling: {{ar_steps: 4, diffusion_steps: 4}}
algorithm: {{prompts_per_step: 2, group_size: 2, head_steps_per_ar_step: 1, train: both}}
# a fresh head zero-initialises its output layer (as upstream), so only the head gets gradients at first
log: {{checkpoint_every: 1, sample_every: 100, tensorboard: false}}
""")
    assert main(["train", str(cfg), "--quiet"]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "steps=3", "--quiet"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    # a run directory loads as its base model plus the latest checkpoint's policy weights: after the run
    # that is exactly the exported generator, and it differs from the base
    from margrpo.models.loading import load_model
    from margrpo.models.mar.image_model import MARImageModel

    from_run = dict(load_model(str(tmp_path / "run"), "cpu").named_parameters())
    exported = dict(MARImageModel.load_pretrained(tmp_path / "run" / "model", device="cpu").named_parameters())
    base = dict(MARImageModel.load_pretrained(model_dir, device="cpu").named_parameters())
    assert from_run.keys() == exported.keys()
    assert all(torch.equal(from_run[k], exported[k]) for k in exported)
    assert any(not torch.equal(from_run[k], base[k]) for k in base)
    assert main(["eval", str(tmp_path / "run"), "--ar-steps", "4", "--per-category", "1", "--quiet"]) == 0

    # bad input on a finished run: one clear error each, and nothing already written changes
    import hashlib

    def snapshot() -> dict[str, str]:
        return {str(p.relative_to(tmp_path / "run")): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}

    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_text('{"prompt": "a red circle"}\n{"prompt": }\n')
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{not json")
    before = snapshot()
    for argv, message in ((["train", "--resume", str(tmp_path / "run"), f"prompts.source={bad_prompts}",
                            "algorithm.ptx_weight=0"], f"{bad_prompts}:2"),
                          (["train", "--resume", str(tmp_path / "run"), f"model={broken_model}"],
                           f"{broken_model / 'config.json'}: not valid JSON"),
                          (["train", "--resume", str(tmp_path / "run"), "algorithm.mte_kk=1"], "mte_kk"),
                          (["train", "--resume", str(tmp_path / "run"), "steps=-4"], "steps"),
                          (["train", "--resume", str(tmp_path / "nowhere")], "no config.yaml"),
                          (["train", str(cfg)], "already holds checkpoints")):
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert snapshot() == before


def test_a_run_directory_without_a_checkpoint_is_a_clear_error(model_dir, tmp_path):
    from margrpo.models.loading import load_model

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without a complete checkpoint"):
        load_model(str(tmp_path / "run"), "cpu")


def test_a_broken_model_folder_is_one_clear_error_naming_the_file(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text('{"format": "margrpo-generator", "mar": {')  # cut short
    assert main(["sample", "--prompt", "a red circle", "--model", str(broken), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'config.json'}: not valid JSON" in err and "Traceback" not in err
    shutil.copy(model_dir / "config.json", broken / "config.json")
    torch.save({"w": torch.zeros(2)}, broken / "model.safetensors")  # a pickle where safetensors were expected
    assert main(["sample", "--prompt", "a red circle", "--model", str(broken), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'model.safetensors'}: not a readable safetensors file" in err and "never unpickles" in err


def test_bad_config_key_is_a_clear_error(model_dir, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"model: {model_dir}\nalgorithm:\n  mte_kk: 3\n")
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mte_kk" in err and "bad.yaml:3" in err and "did you mean 'algorithm.mte_k'" in err


def test_demo_quick_runs_twice_in_the_same_folder(model_dir, tmp_path, capsys):
    args = ["demo", "--quick", "--out", str(tmp_path / "demo"), "--quiet", f"model={model_dir}",
            "sampling.ar_steps=4", "sampling.diffusion_steps=4", "algorithm.prompts_per_step=4",
            "algorithm.group_size=2", "log.tensorboard=false", "threads=1"]
    assert main(args) == 0
    assert main(args) == 0  # `make demo` is idempotent: the second run replaces the first
    out = capsys.readouterr().out
    assert "removing the previous demo run" in out and "| overall |" in out
    assert (tmp_path / "demo" / "grid_before_after.png").is_file()
    after = json.loads((tmp_path / "demo" / "after.json").read_text())
    assert after["summary"]["overall"]["n"] == 32 and 0 <= after["statistics"]["colour_entropy"] <= 9
    assert "| colour_entropy |" in out  # the reward-hacking monitors' statistics, before and after
    # each gain twice: at the same sampler settings, and both models at their best (chosen on training prompts)
    assert "over the base at the same sampler settings" in out and "over the base at its best settings" in out
    assert "the base's computed in" in out and "the base's read from the result cache" in out  # the second run's
    baselines = json.loads((tmp_path / "demo" / "baselines.json").read_text())
    assert set(baselines["trained_grid"]["results"]) == {"train"}  # a trained model's grid: training prompts only
    assert set(baselines["base_grid"]["results"]) == {"train"}  # and so is the base's
    # per-category reward and accuracy of each training step, and the in-loop curve in the report
    rows = [r for r in read_metrics(tmp_path / "demo" / "run") if "reward/mean" in r]
    assert rows and all({f"accuracy/by_category/{c}" for c in ("single", "position")} <= set(r) for r in rows)
    assert all(any(k.startswith("reward/by_category/") for k in r) for r in rows)


def test_compare_writes_a_table_per_method_with_control(model_dir, tmp_path, capsys):
    results_doc = tmp_path / "docs" / "results.md"
    results_doc.parent.mkdir()
    results_doc.write_text("# x\n<!-- compare-results:start -->\nold\n<!-- compare-results:end -->\ntail\n")
    # temperature 1: at compare.yaml's 0.5 the trajectory presets can score no head step of a 4-step head
    rc = main(["compare", "--results", str(results_doc), f"model={model_dir}", "steps=2", "sampling.ar_steps=4",
               "sampling.diffusion_steps=4", "sampling.temperature=1.0",
               "algorithm.prompts_per_step=2", "algorithm.group_size=2", "eval.per_category=2",
               "log.tensorboard=false", "--seeds", "0", "1", "--control-steps", "2", "--out", str(tmp_path / "cmp"),
               "--quiet"])
    assert rc == 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(res["methods"]) == set(res["control"]) == {"grpo", "mar-grpo", "mar-grpo-matching", "nft"}
    assert all(len(r["final_strict"]) == len(r["final_train_strict"]) == 2 for r in res["methods"].values())
    assert all(len(c["seeds"]) == 2 for c in res["control"].values())  # a positive control per seed
    # each run also at its best sampler setting, against the base at its best (both chosen on training prompts)
    assert all(len(r["best_change"]) == len(r["best_setting"]) == 2 for r in res["methods"].values())
    assert set(res["base_grid"]["results"]) == {"train"} and res["base_best_setting"].startswith("guidance")
    assert 0.0 <= res["base_strict"] <= 1.0 and all(0.0 <= r["null_final_strict"] <= 1.0
                                                    for r in res["methods"].values())
    null_cfg = (tmp_path / "cmp" / "null" / "grpo" / "seed-0" / "config.yaml").read_text()
    assert "random: 1.0" in null_cfg and "shapes: 0.0" in null_cfg  # the verifier rides along, unweighted
    metrics = [json.loads(x) for x in
               (tmp_path / "cmp" / "null" / "grpo" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/shapes/strict" in r for r in metrics if "reward/mean" in r)
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| grpo | 2 |" in table and "| mar-grpo | 2 |" in table and "| mar-grpo-matching | 2 |" in table
    assert "| nft | 2 |" in table and "in-distribution" in table and "vs base at its best" in table
    assert (tmp_path / "cmp" / "compare_reward_mean.png").is_file()
    text = results_doc.read_text()
    assert "old" not in text and "| mar-grpo | 2 |" in text and text.endswith("tail\n")
    assert "](images/compare_grad_norm.png)" in text
    assert (tmp_path / "docs" / "images" / "compare_grad_norm.png").is_file()
    capsys.readouterr()
    rc = main(["compare", f"model={model_dir}", "steps=1", "sampling.ar_steps=4", "sampling.diffusion_steps=4",
               "sampling.temperature=1.0", "algorithm.prompts_per_step=2", "algorithm.group_size=2",
               "eval.per_category=2",
               "log.tensorboard=false", "--seeds", "0", "--control-steps", "1", "--out", str(tmp_path / "cmp"),
               "--quiet"])
    assert rc == 0 and "removing the previous comparison" in capsys.readouterr().out  # `make compare` reruns


def test_compare_runs_the_demo_settings_and_its_positive_control_at_temperature_1(tmp_path):
    """compare.yaml is the demo's settings; the main and null runs keep them, the positive control pins
    temperature 1 (the setting of its measured figures) over the config and the user's overrides."""
    from margrpo.configs import config_path
    from margrpo.experiments.compare import Job, _job_config
    from margrpo.rl.config import TrainConfig
    from margrpo.utils.config import load_config

    demo = load_config(TrainConfig, [config_path("demo.yaml")], [])
    temps = {}
    for kind in ("main", "null", "control"):
        job = Job("mar-grpo-matching", 0, kind, str(config_path("compare.yaml")), ("sampling.temperature=0.7",),
                  str(tmp_path), 3)
        cfg = _job_config(job)
        temps[kind] = cfg.sampling.temperature
        assert cfg.algorithm.policy_tokens == "unknown" and cfg.algorithm.estimator == "matching"
    assert temps == {"main": 0.7, "null": 0.7, "control": 1.0}
    main_cfg = _job_config(Job("mar-grpo-matching", 0, "main", str(config_path("compare.yaml")), (), str(tmp_path), 3))
    assert main_cfg.sampling.temperature == demo.sampling.temperature == 0.5 and main_cfg.steps == demo.steps


def test_results_are_written_into_docs_results_md_and_the_readme_stays_short():
    """`make demo`, `demo-long`, `compare` and `bench` write between docs/results.md's markers; the README keeps
    one summary table and stays a user's document under 10 KB."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results, readme = (root / "docs" / "results.md").read_text(), (root / "README.md").read_text()
    for block in ("demo-results", "demo-long-results", "compare-results", "bench-results"):
        assert f"<!-- {block}:start -->" in results and f"<!-- {block}:end -->" in results
        assert f"<!-- {block}:start -->" not in readme
    assert len(readme.encode()) < 10_000
    with pytest.raises(SystemExit, match="--readme was renamed to --results"):
        main(["demo", "--readme", "README.md"])
