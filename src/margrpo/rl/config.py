"""Training configuration: YAML + dotted overrides, validated by `margrpo.utils.config`.

Presets are YAML files (`configs/presets/grpo.yaml`, `configs/presets/mar-grpo.yaml`) that set the
stabiliser switches; a run config names one with `base:`. Plain GRPO and MAR-GRPO therefore run
through exactly the same code with different values. Every option is declared once, here (the `sampling:` section
in `sampling/config.py`, the sampler's own config), with its meaning, default and source; `docs/configuration.md`
is generated from these declarations (`python -m margrpo.rl.config`), and a test fails when it is stale.

A leaf: the loss, the trainer, the monitors and the tools read these dataclasses, and this module imports only the
sampler's config, the loader's `option` and the names of the image statistics (`utils.image_stats`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from margrpo.sampling.config import MTE_SOURCES, POLICY_TOKENS, SCORE_GUIDANCE_MODES, SamplerConfig
from margrpo.utils.config import option
from margrpo.utils.image_stats import STATISTICS

# the estimators of the policy term: each is one function of `rl.loss.LOSSES`
ESTIMATORS = ("trajectory", "matching", "nft")
NORMALIZE_MODES = ("element", "token", "rollout")
# the reward-hacking monitors' default bounds (`monitors.bounds`), measured on the shapes world
# (docs/findings/2026-12-07-reward-hacking-monitors.md); `margrpo.rl.monitors` applies them
DEFAULT_BOUNDS: dict[str, float] = {"brightness": 0.5, "saturation": 0.5, "colour_entropy": 0.5,
                                    "grid_energy": 0.5, "jpeg_bpp": 0.5}
WATCH_BOUND = 0.3  # a watched reward's largest fall, for labels `monitors.bounds` does not name


@dataclass
class AlgorithmSection:
    """The RL objective: GRPO's groups and advantages, PPO's clip and epochs, the KL, and MAR-GRPO's stabilisers."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"guidance": "score_guidance"}
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "chunk_head_steps": "the trajectory loss always back-propagates one scored head step at a time (memory-flat, "
                            "no slower than one graph: docs/findings/2026-12-02-scale.md)",
        "ratio_level": "the PPO ratio is taken per element; pooled per token or image it learned no better "
                       "(docs/findings/2026-12-07-one-trajectory-loss.md)",
        "batch_ar_steps": "each scored AR step has its own transformer forward (one call for all of them gave the "
                          "same gradient and no speed-up)",
        "branch": "branched groups are gone (they learned no better: docs/findings/"
                  "2026-11-30-trainer-readings-before-the-head-step-fix.md)",
        "advantage_eps": "the std is offset by 1e-4 (the MAR-GRPO release's and Flow-GRPO's value)",
        "ar_step_count": "set algorithm.ar_step_fraction (12 of 64 AR steps: 0.1875)",
        "lora_target_modules": "the adapters go on the model family's transformer attention and MLP linears "
                               "(Policy.lora_target_modules)",
        "nft_weighting": "DiffusionNFT's draws are weighed adaptively, as its release",
        "consistency": "set algorithm.policy_tokens: consistent (true) or unknown (false)",
        "advantage_clip": "advantages are not clipped (clipping them at 2 learned no better: docs/findings/"
                          "2026-12-01-noise-dominated-head-steps.md)",
        "dual_clip": "PPO's clip is the only bound: dual-clip PPO (ratio capped at 3 for negative advantages) removed "
                     "the 1e5 policy-loss spikes of the long demo run after step 800 but did not slow its drift "
                     "(docs/findings/2026-12-07-verifier-signal.md, section 6)",
    }

    group_size: int = option(8, "images per prompt (G); advantages are relative within a group (GRPO, Shao et al. "
                             "2024)", range=(2, 4096))
    prompts_per_step: int = option(4, "prompts per rollout; a rollout has prompts_per_step x group_size images",
                                   range=(1, 4096))
    advantage_std: str = option("group", "std that scales the advantages: the group's (GRPO), the batch's "
                                "(Flow-GRPO's global_std) or none", choices=("group", "batch", "none"))
    ar_step_fraction: float = option(0.5, "share of AR steps scored per rollout, drawn per step (MAR-GRPO scores 12 of "
                                     "64)", range=(0.0, 1.0))
    head_steps_per_ar_step: int | None = option(None, "head steps scored per scored AR step, drawn among the "
                                                "scorable ones (null = all; MAR-GRPO scores 10)", range=(1, 1000))
    head_step_max_gain: float = option(3.0, "head steps whose score gain (DiffusionHead.score_gain: std the "
                                       "step's mean moves per unit of network output) exceeds this are not scored, "
                                       "in the policy term, MTE or the KL (docs/findings/2026-12-01-noise-dominated-"
                                       "head-steps.md)", range=(0.0, None))
    head_step_weighting: str = option("none", "weight each scored head step's policy term by its mean std over the "
                                      "mean of the scored steps' (std) or not (docs/findings/2026-12-07-one-"
                                      "trajectory-loss.md)", choices=("none", "std"))
    score_guidance: str = option("rollout", "density the transitions are scored under: the guided one that sampled, or "
                           "the conditional branch alone (the MAR-GRPO release)", choices=SCORE_GUIDANCE_MODES)
    clip_eps: float = option(0.2, "PPO clip range of the ratio (Schulman et al. 2017; 0 = no clip)", range=(0.0, 10.0))
    normalize: str = option("element", "policy-term reduction: mean over an AR step's kept elements, Harmon's sum "
                            "over channels (token), or one mean over the rollout's kept (token, head step) pairs "
                            "(rollout)", choices=NORMALIZE_MODES)
    ppo_epochs: int = option(1, "optimizer passes over each rollout (PPO's epochs)", range=(1, 100))
    update: str = option("rollout", "one optimizer step per rollout and epoch, or one per scored AR step (the "
                         "MAR-GRPO release)", choices=("rollout", "ar_step"))
    beta: float = option(0.01, "KL coefficient against the frozen reference (MAR-GRPO's and Flow-GRPO's 0.01)",
                         range=(0.0, 1e6))
    kl: str = option("gaussian", "the KL: analytic Gaussian per element (Flow-GRPO), or the release's e^d - d - 1 on "
                     "means", choices=("gaussian", "reference"))
    train: str = option("ar", "which parameters train: the AR transformer (MAR-GRPO's frozen head), the head, "
                        "both, or LoRA adapters on the transformer (lora; peft)",
                        choices=("ar", "head", "both", "lora"))
    lora_rank: int = option(8, "LoRA rank r (train: lora; Hu et al. 2021)", range=(1, 4096))
    lora_alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha / r", range=(1e-6, 1e6))
    policy_tokens: str = option("consistent", "tokens in the policy term: those each scored AR step commits (GRPO), "
                                "every still-unknown one, or the still-unknown ones whose head output moved toward "
                                "their final value and the committed ones (MAR-GRPO's consistency-aware selection)",
                                choices=POLICY_TOKENS)
    mte_k: int = option(4, "MAR-GRPO's multi-trajectory expectation: K extra head chains per token (0 = off)",
                        range=(0, 64))
    mte_top_fraction: float = option(0.3, "share of each image's tokens, the most uncertain, scored through the K "
                                     "chains (MAR-GRPO's 30%)", range=(0.0, 1.0))
    mte_source: str = option("commit", "the K chains: drawn under each token's committing step (the release) or the "
                             "scored step, whose scores have zero mean for the committed tokens (the reward does not "
                             "depend on them), or bridges from the forward process to the token's committed value, "
                             "whose scores keep its own contribution (docs/design.md, MTE)", choices=MTE_SOURCES)
    consistency_start: int = option(1, "policy_tokens: consistent: AR steps up to this one are not filtered (the "
                                    "release's i > 1)", range=(0, 4096))
    consistency_tau: float = option(0.0, "policy_tokens: consistent: the cosine gain a token must exceed to be kept "
                                    "(the release's 0)", range=(-2.0, 2.0))
    estimator: str = option("trajectory", "the policy term: the recorded head transitions (GRPO / DDPO, the paper's), "
                            "advantage-weighted matching (Xue et al. 2025) or DiffusionNFT (Zheng et al. 2025, arXiv "
                            "2509.16117)", choices=ESTIMATORS)
    noise_draws: int = option(4, "(noise level, noise) draws per token of the forward-process estimators, stratified "
                              "in noise level, the same in every PPO epoch (docs/findings/2026-12-01-noise-dominated-"
                              "head-steps.md)", range=(1, 1024))
    nft_beta: float = option(1.0, "DiffusionNFT's beta: how far the implicit positive and negative policies "
                             "extrapolate (the release's 1.0)", range=(1e-6, 100.0))
    nft_adv_clip: float = option(5.0, "DiffusionNFT's A_max: r = clamp(A / A_max, -1, 1) / 2 + 1/2 (the release's "
                                 "5; the nft presets use 1)", range=(1e-6, 1e6))
    ptx_weight: float = option(0.0, "PPO-ptx (Ouyang et al. 2022): weight of the MAR pretraining loss on rendered "
                               "shapes-world training images, once per rollout (shapes world only)", range=(0.0, 1e6))
    ptx_batch_size: int = option(64, "images per ptx batch", range=(1, 65536))

    def __post_init__(self) -> None:
        if self.estimator != "trajectory" and self.update != "rollout":
            raise ValueError(f"algorithm.estimator={self.estimator!r} takes its old terms from the policy before the "
                             f"update; with algorithm.update='ar_step' later AR steps would see updated weights "
                             f"(set update='rollout')")
        if self.mte_k == 1:
            raise ValueError("algorithm.mte_k=1 cannot estimate uncertainty; use 0 (off) or >= 2")
        if self.estimator != "trajectory" and self.mte_k:
            raise ValueError("algorithm.mte_k > 0 averages head-trajectory log-probabilities; with "
                             f"algorithm.estimator={self.estimator!r} there are none (set mte_k=0)")
        if self.estimator != "trajectory" and self.head_step_weighting != "none":
            raise ValueError("algorithm.head_step_weighting weighs head steps of the trajectory estimator; "
                             f"with algorithm.estimator={self.estimator!r} set it to 'none'")


@dataclass
class OptimSection:
    """The optimizer: AdamW, or SGD with momentum `beta1`, at a constant learning rate, with gradient clipping."""

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "beta2": "Adam's second-moment decay is 0.999 (torch's default)",
        "weight_decay": "no weight decay (no measurement or paper behind one here)",
        "warmup_steps": "the learning rate is constant, as the MAR-GRPO release's",
        "schedule": "the learning rate is constant, as the MAR-GRPO release's",
    }

    name: str = option("adamw", "adamw or sgd (momentum beta1)", choices=("adamw", "sgd"))
    lr: float = option(1e-4, "peak learning rate", range=(0.0, 10.0))
    beta1: float = option(0.9, "Adam's first-moment decay, or SGD's momentum", range=(0.0, 1.0))
    grad_clip: float = option(1.0, "max global gradient norm (0 = no clipping)", range=(0.0, None))


@dataclass
class PromptSection:
    """Where training prompts come from: the shapes world's train split, or a prompt file."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"balance_categories": "category_balance"}
    REMOVED_KEYS: ClassVar[dict[str, str]] = {"categories": "the shapes world trains on all its categories"}

    source: str = option("shapes", "shapes, or a prompt file: GenEval metadata JSONL, T2I-R1 JSONL, JSONL with a "
                         "'prompt' key, or text")
    fixed: list[str] | None = option(None, "train on exactly these prompts (positive controls, debugging)")
    category_balance: str = option("stratified", "how a step's prompts spread over the categories (the shapes train "
                                   "split is 80% position prompts): stratified = prompts_per_step // C of each of "
                                   "the C categories, the rest from distinct categories drawn at random, so every "
                                   "category is in every step when prompts_per_step >= C; random = a category drawn "
                                   "uniformly per prompt (the former balance_categories: true); off = prompts drawn "
                                   "uniformly from the pool (balance_categories: false)",
                                   choices=("stratified", "random", "off"))


@dataclass
class LogSection:
    """What the run directory receives, and how often (metrics every step; the last 2 checkpoints are kept)."""

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "log_every": "metrics are logged every step",
        "keep_checkpoints": "the last 2 checkpoints are kept",
        **dict.fromkeys(("wandb_project", "wandb_run_name", "wandb_mode", "wandb_dir"),
                        "set W&B's own environment variables (WANDB_PROJECT, WANDB_NAME, WANDB_MODE, WANDB_DIR)"),
    }

    sample_every: int = option(10, "steps between sample grids (samples/step-N.png)", range=(1, None))
    checkpoint_every: int = option(10, "steps between checkpoints", range=(1, None))
    tensorboard: bool = option(True, "also write TensorBoard events")
    wandb: bool = option(False, "also log the metrics.jsonl rows to Weights & Biases (rank 0 only; pip install wandb; "
                         "W&B's environment variables set the project, name, mode and directory: by default "
                         "margrpo, the run directory's name, online, the run directory)")


@dataclass
class EvalSection:
    """Verifier accuracy of the shapes world during and after training (`margrpo.worlds.shapes.evaluate`).

    The same prompts and seeds at every evaluation, so each change carries a paired standard error against step 0.
    """

    every: int = option(0, "steps between in-loop evaluations, also at step 0 and the end (0 = none; demo and compare "
                        "evaluate themselves)", range=(0, None))
    per_category: int = option(64, "images per category and split (each category's prompts drawn over all of them, "
                               "without replacement where there are enough; worlds/shapes/evaluate.py)",
                               range=(1, None))
    seed: int = option(1234, "seed of the evaluation prompts and images: the same sets in `margrpo eval`, the demo, "
                       "compare and the in-loop evaluation")
    in_distribution: bool = option(False, "also score training prompts with fresh seeds")
    ema_decay: float = option(0.0, "also keep and evaluate an EMA of the trained weights (Flow-GRPO's); 0 = off",
                              range=(0.0, 0.999999))


@dataclass
class MonitorSection:
    """Reward-hacking monitors: each in-loop evaluation's images and watched rewards against step 0's.

    On wherever `eval.every` evaluates (docs/failures.md, "Reward hacking"; `margrpo.rl.monitors`). Why: hacked
    rewards ruin images unnoticed while the reward curve rises: grid artifacts within a few epochs (flow_grpo#233),
    images drifting brighter (DiffusionNFT#47), erased backgrounds (UniRL#407, colour entropy down 54%). Drift is
    the change of the mean in standard deviations of step 0's per-image values.
    """

    bounds: dict[str, float | None] = option(
        factory=dict, help="largest drift allowed per monitored value (a watched reward: largest fall), over the "
        "defaults measured on the shapes world ("
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BOUNDS.items()) + f", each watched reward {WATCH_BOUND:g}; "
        "docs/findings/2026-12-07-reward-hacking-monitors.md); null records a value without a bound", range=(0.0, None))
    watch: dict[str, dict] = option(
        factory=dict, help="held-out rewards scored on the evaluation images, never trained on: label -> the "
        "reward's options as in `rewards:` (`type:` when the label is not the reward's name), e.g. {imagereward: "
        "{checkpoint: ...}} beside a run trained on hpsv2")
    stop: bool = option(False, "stop the run at the first evaluation beyond a bound; every evaluation within the "
                        "bounds is then a checkpoint, and `--resume` continues from the last of them")

    def __post_init__(self) -> None:
        clash = sorted(set(self.watch) & set(STATISTICS))
        if clash:
            raise ValueError(f"monitors.watch: labels {clash} are names of image statistics; choose other labels")
        unknown = sorted(set(self.bounds) - set(STATISTICS) - set(self.watch))
        if unknown:
            raise ValueError(f"monitors.bounds: {unknown} is neither an image statistic ({', '.join(STATISTICS)}) "
                             f"nor a label of monitors.watch ({', '.join(self.watch) or 'none'})")
        for label, opts in self.watch.items():
            if "weight" in opts:
                raise ValueError(f"monitors.watch.{label}: a watched reward has no weight (it is not trained on); "
                                 "its bound goes in monitors.bounds")


@dataclass
class FaultSection:
    """Which steps count as bad (docs/failures.md); 3 in a row stop a run.

    A step is bad when a loss, the gradient norm or a rollout's tokens or log-probabilities are not finite, or the
    KL / the largest PPO log-ratio exceed the bounds; it is skipped with weights, optimizer and EMA restored.
    Non-finite rewards are handled per image by the rewards' validity masks and `max_reward_failure_fraction`.
    """

    REMOVED_KEYS: ClassVar[dict[str, str]] = {"max_consecutive": "3 bad steps in a row stop a run"}

    max_kl: float | None = option(None, "a step whose KL to the reference exceeds this is bad (null = no bound)",
                                  range=(0.0, None))
    max_log_ratio: float | None = option(None, "a step whose largest |log PPO ratio| exceeds this is bad (null = no "
                                         "bound)", range=(0.0, None))


@dataclass
class DistributedSection:
    """Multi-process runs under `torchrun` (WORLD_SIZE > 1; ignored by a single process but for the shards).

    The global batch is `algorithm.prompts_per_step` groups drawn as `rollout_shards` shards of whole groups, each
    from its own random streams; a process draws the shards it owns. With the shard count fixed, the run's result
    does not depend on the number of processes (docs/design.md, "Distributed").
    """

    strategy: str = option("ddp", "how the processes share the policy: DDP (a replica each) or FSDP2 "
                           "(fully_shard: parameters, gradients and optimizer state sharded)", choices=("ddp", "fsdp"))
    rollout_shards: int | None = option(None, "shards the global batch is drawn in, a multiple of the world size "
                                        "dividing prompts_per_step (null = the world size: one per process)",
                                        range=(1, 4096))


@dataclass
class TrainConfig:
    """A training run: `margrpo train CONFIG [key=value ...]`."""

    model: str = option("shipped:shapes-base", "a model folder, a training run directory, or shipped:NAME")
    out_dir: str = option("runs/train", "the run directory")
    seed: int = option(0, "every random stream of the run derives from (seed, stream, rank, step)")
    steps: int = option(50, "training steps (one rollout each)", range=(1, 10_000_000))
    rewards: dict[str, float] = option(factory=lambda: {"shapes": 1.0},
                                       help="reward name -> weight (docs/rewards.md); each part is logged")
    reward_options: dict[str, dict] = option(factory=dict, help="reward name -> constructor options")
    max_reward_failure_fraction: float = option(0.1, "share of invalid rewards over the run that stops it",
                                                range=(0.0, 1.0))
    prompts: PromptSection = option(factory=PromptSection, help="training prompts")
    sampling: SamplerConfig = option(factory=SamplerConfig, help="rollouts, and the in-loop evaluation's images")
    algorithm: AlgorithmSection = option(factory=AlgorithmSection, help="the objective")
    optim: OptimSection = option(factory=OptimSection, help="the optimizer")
    log: LogSection = option(factory=LogSection, help="run-directory outputs")
    eval: EvalSection = option(factory=EvalSection, help="in-loop evaluation")
    faults: FaultSection = option(factory=FaultSection, help="numerical faults")
    monitors: MonitorSection = option(factory=MonitorSection, help="reward-hacking monitors")
    distributed: DistributedSection = option(factory=DistributedSection, help="multi-process runs (torchrun)")
    device: str = option("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    autocast: str = option("none", "bf16 autocast for the networks (log-probs stay float32)", choices=("none", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute the transformer's activations in backward instead of "
                                          "storing them (`Policy.set_gradient_checkpointing`; the same gradient)")
    threads: int = option(1, "torch CPU threads (0 = torch's default)", range=(0, 256))

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ValueError("rewards: at least one reward is needed, e.g. {shapes: 1.0}")
        if self.eval.every == 0 and (self.monitors.stop or self.monitors.watch):
            raise ValueError("monitors.stop and monitors.watch act at the in-loop evaluations; set eval.every > 0")


DOCS_HEADER = """# Configuration

Generated from the dataclasses in `src/margrpo/rl/config.py` (the `sampling` section: `src/margrpo/sampling/config.py`)
by `python -m margrpo.rl.config`; do not edit by hand. A config is a YAML file (with `base:` naming files it builds
on, e.g. a preset) plus `key=value` overrides; unknown keys, wrong types and values outside the listed range or
choices are errors naming the file and line. Presets (`configs/presets/*.yaml`) are such files.
"""


def configuration_markdown() -> str:
    from margrpo.utils.config_docs import render

    return DOCS_HEADER + "\n" + render(TrainConfig)


if __name__ == "__main__":  # pragma: no cover - `python -m margrpo.rl.config [OUT]` rewrites docs/configuration.md
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
    out.write_text(configuration_markdown())
    print(f"wrote {out}")
