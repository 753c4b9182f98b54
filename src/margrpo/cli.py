"""`margrpo ...`: the command-line entry point; each subcommand wires library pieces, nothing more."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _results_doc(args: argparse.Namespace) -> Path | None:  # `--readme`: its name while results were in README
    if args.readme:
        raise SystemExit("--readme was renamed to --results: the results live in docs/results.md")
    return Path(args.results) if args.results else None


def _set_threads(n: int | None) -> None:  # tiny models run faster on one thread than two on a shared 2-core CPU
    if n:
        torch.set_num_threads(n)


def _load_model(path: str | None, device: str):
    from margrpo.models.loading import load_model

    return load_model(path or "shipped:shapes-base", device)


def cmd_sample(args: argparse.Namespace) -> int:
    from margrpo.sampling.config import SamplerConfig
    from margrpo.sampling.pipeline import MARPipeline
    from margrpo.utils.images import make_grid, save_png

    _set_threads(args.threads)
    model = _load_model(args.model, args.device)
    cfg = SamplerConfig(ar_steps=args.ar_steps, diffusion_steps=args.diffusion_steps,
                        guidance_scale=args.guidance_scale, temperature=args.temperature)
    pipe, prompts, t0 = MARPipeline(model, cfg), args.prompt, time.perf_counter()
    images = pipe(prompts, num_images_per_prompt=args.n, seed=args.seed, progress=not args.quiet)
    dt = time.perf_counter() - t0
    labels = [p for p in prompts for _ in range(args.n)]
    grid = make_grid(images, nrow=min(args.n, 8), labels=labels if args.captions else None, upscale=args.upscale)
    save_png(grid, args.out)
    print(f"wrote {args.out} ({len(images)} images in {dt:.1f}s, {len(images) / dt:.1f} images/s)")
    return 0


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a grid of images from a model")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("-n", type=int, default=8, help="images per prompt")
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.add_argument("--model", default=None, help="model folder, training run directory (latest checkpoint) "
                   "or shipped:NAME (default: the shipped shapes model)")
    p.add_argument("--ar-steps", type=int, default=16)
    p.add_argument("--diffusion-steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--upscale", type=int, default=4)
    p.add_argument("--captions", action="store_true", help="write each prompt under its image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)


def cmd_demo(args: argparse.Namespace) -> int:
    from margrpo.experiments.demo import run_demo

    return run_demo(Path(args.out), quick=args.quick, quiet=args.quiet, overrides=args.overrides, config=args.config,
                    results_doc=_results_doc(args))


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded shapes world")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo")
    p.add_argument("--config", default="demo.yaml", help="shipped config to run (demo.yaml, demo-long.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo config, e.g. steps=30")
    p.add_argument("--results", default=None, help="write the results into this file's demo block (docs/results.md)")
    p.add_argument("--readme", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """With an optional CONFIG before the overrides, argparse puts a first `key=value` in the CONFIG slot."""
    if args.config is not None and "=" in args.config and not Path(args.config).is_file():
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from margrpo.utils.config import load_config
    from margrpo.worlds.shapes.pretrain import PretrainConfig, pretrain

    config, overrides = _config_and_overrides(args)
    cfg = load_config(PretrainConfig, config, overrides)
    pretrain(cfg, resume=args.resume, progress=not args.quiet)
    return 0


def add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a text-to-image MAR on the shapes world")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100 model.width=64")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)


def cmd_train(args: argparse.Namespace) -> int:
    from margrpo.rl.config import TrainConfig
    from margrpo.rl.trainer import Trainer
    from margrpo.utils.config import load_config

    config, overrides = _config_and_overrides(args)
    if args.resume:
        run = Path(args.resume)
        cfg_path = run / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--resume {run}: no config.yaml in that run directory")
        if config is not None:
            raise ValueError(f"--resume takes the config from {cfg_path}; got an extra CONFIG {config!r}")
        cfg = load_config(TrainConfig, cfg_path, [*overrides, f"out_dir={run}"])
    else:
        if config is None:
            raise ValueError("margrpo train needs a CONFIG file (see configs/) or --resume RUN_DIR")
        cfg = load_config(TrainConfig, config, overrides)
    trainer = Trainer(cfg, progress=not args.quiet)
    metrics = trainer.run(resume=bool(args.resume))
    if trainer.rank != 0:  # under torchrun, rank 0 reports (the other ranks return no rows)
        return 0
    last = metrics[-1] if metrics else {}
    print(f"done: {cfg.out_dir} (step {last.get('step')}, reward {last.get('reward/mean', float('nan')):.4f})")
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="GRPO / MAR-GRPO fine-tuning")
    p.add_argument("config", nargs="?", default=None, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=20 algorithm.mte_k=0")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its last checkpoint")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)


PASS_AT_K_PROMPTS = 50  # prompts per category of `margrpo eval --pass-at-k` unless --per-category


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from margrpo.configs import config_path
    from margrpo.rl.config import TrainConfig
    from margrpo.utils.config import load_config
    from margrpo.worlds.shapes.evaluate import eval_sets, evaluate_set, format_summary, strict_accuracy
    from margrpo.worlds.shapes.sampler_grid import GUIDANCES, TEMPERATURES, cached_grid, grid_settings

    _set_threads(args.threads)
    cfg = load_config(TrainConfig, args.config if Path(args.config).is_file() else config_path(args.config), [])
    for name in ("per_category", "ar_steps", "diffusion_steps", "samples_per_prompt"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    spec = args.checkpoint or cfg.model
    model = _load_model(spec, args.device)
    base = cfg.sampling
    sampler = dataclasses.replace(
        base, ar_steps=args.ar_steps or base.ar_steps,
        diffusion_steps=args.diffusion_steps or base.diffusion_steps,
        guidance_scale=(args.guidance_scale or [base.guidance_scale])[0],
        temperature=(args.temperature or [base.temperature])[0])
    seed = cfg.eval.seed if args.seed is None else args.seed
    per_category = args.per_category or (PASS_AT_K_PROMPTS if args.pass_at_k else cfg.eval.per_category)
    record: dict = {"checkpoint": spec, "config": args.config, "sampler": dataclasses.asdict(sampler), "seed": seed}
    if args.pass_at_k:
        from margrpo.worlds.shapes.pass_at_k import measure_pass_at_k

        n = args.samples_per_prompt or max(args.pass_at_k)
        record["pass_at_k"] = {}
        for split in ("heldout", "train"):
            pk = measure_pass_at_k(model, sampler, split, per_category, n, args.pass_at_k, seed,
                                   progress=not args.quiet)
            print(f"pass@k, {split} prompts ({n} samples per prompt, {pk.seconds:.1f}s; ± s.e. over prompts):\n"
                  f"{pk.table()}\n")
            record["pass_at_k"][split] = pk.to_json()
    elif args.grid or len(args.guidance_scale or []) > 1 or len(args.temperature or []) > 1:
        settings = grid_settings(args.guidance_scale or (GUIDANCES if args.grid else [sampler.guidance_scale]),
                                 args.temperature or (TEMPERATURES if args.grid else [sampler.temperature]))
        grid = cached_grid(spec, model, eval_sets(per_category, seed), sampler, settings, progress=not args.quiet,
                           use_cache=not args.no_cache)
        print(grid.report())
        best = grid.chosen()
        acc, se = strict_accuracy(grid.result("heldout", best))["overall"]
        record.update(grid=grid.to_json(), chosen=dataclasses.asdict(best), heldout_at_chosen=[acc, se])
    else:
        res = evaluate_set(model, eval_sets(per_category, seed, ("heldout",))["heldout"], sampler,
                           progress=not args.quiet)
        print(format_summary(res.summary, strict_accuracy(res)))
        print(f"{len(res.prompts)} held-out images in {res.seconds:.1f}s (strict ± s.e. clustered by prompt)")
        record["summary"] = res.summary
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model on the held-out shapes prompts with the verifier; with --grid, "
                       "at its best sampler settings chosen on training prompts; with --pass-at-k, pass@k")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="model folder (a run's model/), a training run directory (its latest checkpoint), "
                        "or shipped:NAME (default: the config's model, the shipped base)")
    p.add_argument("--config", default="demo.yaml", help="training config (a file, or a shipped one: demo.yaml) "
                   "whose evaluation settings are the defaults: its sampler, eval.per_category and eval.seed, so "
                   "that `margrpo eval` scores what the demo and compare score")
    p.add_argument("--per-category", type=int, default=None, help="images per category and split (default: the "
                   "config's eval.per_category; with --pass-at-k, distinct prompts per category, default 50)")
    p.add_argument("--ar-steps", type=int, default=None, help="AR steps (default: the config's)")
    p.add_argument("--diffusion-steps", type=int, default=None, help="head steps (default: the config's)")
    p.add_argument("--guidance-scale", type=float, nargs="+", default=None, metavar="G",
                   help="guidance scale(s); several make a grid with --temperature (default: the config's)")
    p.add_argument("--temperature", type=float, nargs="+", default=None, metavar="T",
                   help="temperature(s); several make a grid with --guidance-scale (default: the config's)")
    p.add_argument("--grid", action="store_true", help="the guidance 1/2/3 x temperature 1/0.7/0.5 grid (unless "
                   "given): each setting on training and held-out prompts, the best chosen on training prompts, "
                   "its held-out accuracy reported")
    p.add_argument("--no-cache", action="store_true", help="compute the grid again even if the result cache "
                   "holds it (~/.cache/margrpo, or $MARGRPO_CACHE_DIR)")
    p.add_argument("--pass-at-k", type=int, nargs="+", default=None, metavar="K",
                   help="pass@k per category for these k, on held-out and training prompts")
    p.add_argument("--samples-per-prompt", type=int, default=None, help="samples per prompt for --pass-at-k "
                   "(default: the largest k)")
    p.add_argument("--seed", type=int, default=None, help="seed of the evaluation prompts and images (default: "
                   "the config's eval.seed, 1234)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_compare(args: argparse.Namespace) -> int:
    from margrpo.experiments.compare import METHODS, run_compare

    _set_threads(args.threads)
    config, overrides = _config_and_overrides(args)
    run_compare(config, Path(args.out), args.methods or list(METHODS), args.seeds, overrides, args.control_steps,
                quiet=args.quiet, results_doc=_results_doc(args), workers=args.workers)
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="the presets side by side with the same seeds and budget, plus null and "
                                       "positive controls")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: compare.yaml, the demo's settings)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    p.add_argument("--methods", nargs="+", default=None,
                   help="presets to compare (configs/presets/NAME.yaml; default grpo mar-grpo mar-grpo-matching nft)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one process (and thread) each")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--control-steps", type=int, default=20, help="steps of the positive-control run per method")
    p.add_argument("--results", default=None, help="write the table and plots into this file's compare block")
    p.add_argument("--readme", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from margrpo.configs import config_path
    from margrpo.rl.config import TrainConfig
    from margrpo.rl.diagnose import run_diagnose
    from margrpo.utils.config import load_config

    _set_threads(args.threads)
    config, overrides = _config_and_overrides(args)
    cfg = load_config(TrainConfig, config or config_path("demo.yaml"), overrides)
    run_diagnose(cfg, Path(args.json) if args.json else None, args.step, args.agreement)
    return 0


def add_diagnose_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="per-head-step score gain, x0 clamping, gradient share and PPO log-ratio "
                       "of one rollout (which head steps carry signal)")
    p.add_argument("config", nargs="?", default=None, help="training YAML config (default: the demo config)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.diffusion_steps=25")
    p.add_argument("--step", type=int, default=0, help="which training step's prompts and seeds to use")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (and a .md beside it)")
    p.add_argument("--agreement", type=int, default=0, metavar="N",
                   help="also measure gradient agreement between N independent rollout batches (N >= 4)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_diagnose)


def _mar_args(items: list[str]) -> dict:
    """`--mar-arg KEY=VALUE` pairs; values are JSON where they parse (2, 0.1, "100"), else strings."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--mar-arg {item!r}: expected KEY=VALUE, e.g. encoder_num_heads=16")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    if args.format == "harmon":
        from margrpo.models.harmon import loading as harmon

        if args.llm is None:
            raise ValueError("convert harmon needs --llm (the Qwen2.5-*-Instruct folder: config.json + tokenizer)")
        out = harmon.convert(args.checkpoint, args.out, llm=args.llm, vae=args.vae, **_mar_args(args.mar_arg))
        print(f"wrote {out} (name it in a training config as model: {out})")
        return 0
    from margrpo.models.mar import lth14

    if args.vae is None:
        raise ValueError("convert lth14 needs --vae (the kl16.ckpt the MAR's tokens decode with)")
    out = lth14.convert(args.checkpoint, args.out, vae=args.vae, ema=not args.no_ema, overwrite=args.force,
                        **_mar_args(args.mar_arg))
    print(f"wrote {out} (name it in a training config as model: {out})")
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write another project's checkpoint as a margrpo model folder")
    p.add_argument("format", choices=["lth14", "harmon"],
                   help="lth14: LTH14/mar's checkpoint-last.pth (with --vae kl16.ckpt); harmon: wusize/Harmon's "
                        ".pth (with --llm QWEN_FOLDER and --vae kl16.ckpt)")
    p.add_argument("checkpoint", help="the checkpoint file")
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--vae", default=None, help="the KL-16 autoencoder (kl16.ckpt) the tokens decode with (lth14: "
                   "required; harmon: when the .pth holds no vae.* weights)")
    p.add_argument("--no-ema", action="store_true", help="take the raw weights ('model'), not 'model_ema'")
    p.add_argument("--llm", default=None, help="harmon: the Qwen2.5 folder (only config.json and the tokenizer)")
    p.add_argument("--mar-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an upstream MAR argument the weights cannot give (e.g. encoder_num_heads=16); repeatable")
    p.add_argument("--force", action="store_true", help="lth14: write into an existing non-empty folder")
    p.set_defaults(func=cmd_convert)


def add_serve_reward_parser(sub: argparse._SubParsersAction) -> None:
    from margrpo.rewards.cli import add_serve_reward_parser as add
    from margrpo.rewards.cli import run_serve_reward

    add(sub).set_defaults(func=run_serve_reward)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="margrpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(sub)
    add_pretrain_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_compare_parser(sub)
    add_diagnose_parser(sub)
    add_serve_reward_parser(sub)
    add_convert_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from margrpo.rewards.base import RewardFailure
    from margrpo.rl.faults import TrainingFault, TrainingStopped
    from margrpo.utils.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TrainingStopped as e:  # SIGINT / SIGTERM: the step finished and its checkpoint is written
        print(f"margrpo {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrainingFault as e:
        print(f"margrpo {args.command}: error: {e}", file=sys.stderr)
        return 3
    except RewardFailure as e:  # too many images without a reward: the trainer saved a checkpoint first
        print(f"margrpo {args.command}: error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training: stop at once
        print(f"margrpo {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, TypeError, CheckpointError) as e:
        print(f"margrpo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
