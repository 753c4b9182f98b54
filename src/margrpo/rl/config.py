"""Training configuration: YAML + dotted overrides, validated by `margrpo.utils.config`.

Presets are YAML files (`configs/presets/grpo.yaml`, `configs/presets/mar-grpo.yaml`) that set the
stabiliser switches; a run config names one with `base:`. Plain GRPO and MAR-GRPO therefore run
through exactly the same code with different values. Every option is declared once, here, with its meaning,
default and source; `docs/configuration.md` is generated from these declarations (`python -m
margrpo.utils.config_docs`), and a test fails when it is stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from margrpo.rl.monitors import DEFAULT_BOUNDS, WATCH_BOUND
from margrpo.rl.objective import ESTIMATORS, NORMALIZE_MODES, RATIO_LEVELS, ObjectiveConfig
from margrpo.sampling.sampler import SCORE_GUIDANCE_MODES, SamplerConfig
from margrpo.utils.config import option
from margrpo.utils.image_stats import STATISTICS


@dataclass
class SamplingSection:
    """How rollouts are drawn (fewer AR and head steps and no CFG make rollouts cheap)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"cfg": "guidance_scale", "cfg_schedule": "guidance_schedule"}

    ar_steps: int = option(8, "AR steps per image (MAR's cosine mask schedule decides how many tokens each commits)",
                           range=(1, 4096))
    diffusion_steps: int = option(10, "head denoising steps per token (the head's schedule respaced to this)",
                                  range=(1, 1000))
    guidance_scale: float = option(1.0, "classifier-free guidance scale of rollouts (1 = none: half the cost)",
                                   range=(1.0, 50.0))
    guidance_schedule: str | None = option(None, "guidance over AR steps: MAR's linear ramp from 1 to "
                                           "`guidance_scale`, or constant; null = the model family's (linear for "
                                           "MAR, constant for NOVA and Harmon, as upstream)",
                                           choices=("linear", "constant"))
    temperature: float = option(1.0, "scale of the head's sampling std", range=(0.01, 10.0))
    batch_mte_chains: bool = option(True, "draw the K MTE chains together, each token's conditioning computed once "
                                    "for its K chains (measured: the chains 1.36x, the whole mar-grpo rollout 1.13x "
                                    "faster); false runs them one by one, with K times less transient head memory "
                                    "(the same chains up to matmul rounding: each chain's noise is drawn in the "
                                    "sequential order)")
    compile: bool = option(False, "torch.compile the transformer and the head network for rollouts (minutes of "
                           "compiling, then faster steps; the trainer's replay stays eager)")


@dataclass
class AlgorithmSection:
    """The RL objective: GRPO's groups and advantages, PPO's clip and epochs, the KL, and MAR-GRPO's stabilisers."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"guidance": "score_guidance"}

    group_size: int = option(8, "images per prompt (G); advantages are relative within a group", range=(2, 4096))
    prompts_per_step: int = option(4, "prompts per rollout; a rollout has prompts_per_step x group_size images",
                                   range=(1, 4096))
    advantage_std: str = option("group", "std that scales the advantages: the group's (GRPO), the batch's "
                                "(Flow-GRPO's global_std) or none", choices=("group", "batch", "none"))
    advantage_eps: float = option(1e-4, "added to the std before dividing", range=(0.0, 1.0))
    advantage_clip: float | None = option(None, "advantages beyond +-this are clipped (Flow-GRPO, DanceGRPO, DDPO: "
                                          "5); null = no clip", range=(1e-6, None))
    ar_step_fraction: float = option(0.5, "share of AR steps scored per rollout (drawn per step)", range=(0.0, 1.0))
    ar_step_count: int | None = option(None, "AR steps scored per rollout (overrides ar_step_fraction)",
                                       range=(1, 4096))
    head_steps_per_ar_step: int | None = option(None, "head steps scored per scored AR step, drawn among the "
                                                "scorable ones (null = all)", range=(1, 1000))
    head_step_max_gain: float = option(3.0, "head steps whose score gain (DiffusionHead.score_gain: std the "
                                       "step's mean moves per unit of network output) exceeds this are not scored, "
                                       "in the policy term, MTE or the KL (docs/findings/2026-12-01-noise-dominated-"
                                       "head-steps.md)", range=(0.0, None))
    head_step_weighting: str = option("none", "weight each scored head step's policy term by its mean std (std) "
                                      "or not", choices=("none", "std"))
    score_guidance: str = option("rollout", "density the transitions are scored under: the guided one that sampled, or "
                           "the conditional branch alone (the MAR-GRPO release)", choices=SCORE_GUIDANCE_MODES)
    clip_eps: float = option(0.2, "PPO clip range of the ratio (0 = no clip)", range=(0.0, 10.0))
    dual_clip: float | None = option(None, "dual-clip PPO bound c on negative advantages' objective (Ye et al. "
                                     "2020)", range=(1.0, 100.0))
    ratio_level: str = option("element", "where the PPO ratio is taken: per element (the paper's), or its log pooled "
                              "per token or per image before the clip (Flow-GRPO / DanceGRPO pool per image)",
                              choices=RATIO_LEVELS)
    normalize: str = option("element", "policy-term reduction: mean over an AR step's kept elements, Harmon's sum "
                            "over channels (token), or one mean over the rollout's kept (token, head step) pairs "
                            "(rollout)", choices=NORMALIZE_MODES)
    ppo_epochs: int = option(1, "optimizer passes over each rollout", range=(1, 100))
    update: str = option("rollout", "one optimizer step per rollout and epoch, or one per scored AR step (the "
                         "MAR-GRPO release)", choices=("rollout", "ar_step"))
    batch_ar_steps: bool = option(False, "one transformer forward and backward for all scored AR steps (rows "
                                  "padded to the longest known set; the same gradient); needs update=rollout")
    beta: float = option(0.01, "KL coefficient against the frozen reference", range=(0.0, 1e6))
    kl: str = option("gaussian", "the KL: analytic Gaussian per element (Flow-GRPO), or the release's e^d - d - 1 on "
                     "means", choices=("gaussian", "reference"))
    train: str = option("ar", "which parameters train: the AR transformer (MAR-GRPO's frozen head), the head, "
                        "both, or LoRA adapters on the transformer (lora; peft)",
                        choices=("ar", "head", "both", "lora"))
    lora_rank: int = option(8, "LoRA rank r (train: lora)", range=(1, 4096))
    lora_alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha / r", range=(1e-6, 1e6))
    lora_target_modules: list[str] | None = option(None, "module-name suffixes the adapters go on (peft's "
                                                   "target_modules); null = the family's transformer attention and "
                                                   "MLP linears (`Policy.lora_target_modules`), never the head")
    policy_tokens: str = option("unknown", "tokens in the policy term: those each scored AR step commits, or every "
                                "still-unknown one (MAR-GRPO)", choices=("committed", "unknown"))
    mte_k: int = option(4, "MAR-GRPO's multi-trajectory expectation: K extra head chains per token (0 = off)",
                        range=(0, 64))
    mte_top_fraction: float = option(0.3, "share of each image's tokens, the most uncertain, scored through the K "
                                     "chains", range=(0.0, 1.0))
    mte_source: str = option("commit", "condition the K chains are drawn under: each token's committing step (the "
                             "release) or the scored step", choices=("commit", "scored"))
    chunk_head_steps: int = option(0, "memory-flat MTE: the trajectory loss's main trajectory, then the K MTE chains "
                                   "of the uncertain tokens together, are back-propagated this many scored head steps "
                                   "at a time, so one chunk's head graph is alive instead of all J steps' for the "
                                   "1 + K trajectories (the same gradient; 0 = one graph)",
                                   range=(0, 4096))
    consistency: bool = option(True, "MAR-GRPO's consistency-aware selection: a still-unknown token stays in the "
                               "policy term only if its head output moved toward its final value")
    consistency_start: int = option(1, "AR steps up to this one are not filtered", range=(0, 4096))
    consistency_tau: float = option(0.0, "the cosine gain a token must exceed to be kept", range=(-2.0, 2.0))
    estimator: str = option("trajectory", "the policy term: the recorded head transitions (GRPO / DDPO, the paper's), "
                            "advantage-weighted matching (Xue et al. 2025) or DiffusionNFT (Zheng et al. 2025, arXiv "
                            "2509.16117)", choices=ESTIMATORS)
    noise_draws: int = option(4, "(noise level, noise) draws per token of the forward-process estimators, stratified "
                              "in noise level, the same in every PPO epoch", range=(1, 1024))
    nft_beta: float = option(1.0, "DiffusionNFT's beta: how far the implicit positive and negative policies "
                             "extrapolate (the release's 1.0)", range=(1e-6, 100.0))
    nft_adv_clip: float = option(5.0, "DiffusionNFT's A_max: r = clamp(A / A_max, -1, 1) / 2 + 1/2 (the release's "
                                 "5; the nft presets use 1)", range=(1e-6, 1e6))
    nft_weighting: str = option("adaptive", "DiffusionNFT's weighting of each draw: squared error over its detached "
                                "mean absolute error (the release's), or plain squared error",
                                choices=("adaptive", "mse"))
    branch: bool = option(False, "branched groups: a group's images share order and head noise except at one AR step, "
                          "the only one scored (measured: no gain)")
    ptx_weight: float = option(0.0, "PPO-ptx (Ouyang et al. 2022): weight of the MAR pretraining loss on rendered "
                               "shapes-world training images, once per rollout (shapes world only)", range=(0.0, 1e6))
    ptx_batch_size: int = option(64, "images per ptx batch", range=(1, 65536))

    def __post_init__(self) -> None:
        if self.branch and self.ar_step_count not in (None, 1):
            raise ValueError(f"algorithm.branch scores exactly one AR step (the branch step); got "
                             f"ar_step_count={self.ar_step_count} (leave it unset or 1)")
        if self.batch_ar_steps and self.update != "rollout":
            raise ValueError("algorithm.batch_ar_steps shares one forward between the scored AR steps; with "
                             "algorithm.update='ar_step' every step has its own optimizer step (set update='rollout')")
        if self.estimator != "trajectory" and self.update != "rollout":
            raise ValueError(f"algorithm.estimator={self.estimator!r} takes its old terms from the policy before the "
                             f"update; with algorithm.update='ar_step' later AR steps would see updated weights "
                             f"(set update='rollout')")
        if self.mte_k == 1:
            raise ValueError("algorithm.mte_k=1 cannot estimate uncertainty; use 0 (off) or >= 2")
        if self.consistency and self.policy_tokens != "unknown":
            raise ValueError("algorithm.consistency filters still-unknown tokens, so it needs "
                             "algorithm.policy_tokens='unknown' (or set consistency=false)")
        if self.estimator != "trajectory" and self.mte_k:
            raise ValueError("algorithm.mte_k > 0 averages head-trajectory log-probabilities; with "
                             f"algorithm.estimator={self.estimator!r} there are none (set mte_k=0)")
        if self.estimator != "trajectory" and self.ratio_level != "element":
            raise ValueError("algorithm.ratio_level pools the trajectory estimator's log-ratios; with "
                             f"algorithm.estimator={self.estimator!r} set it to 'element'")
        if self.chunk_head_steps and (self.ratio_level != "element" or self.head_step_weighting != "none"):
            raise ValueError("algorithm.chunk_head_steps > 0 back-propagates chunks of independent terms; "
                             "pooled ratios (ratio_level) and std weights (head_step_weighting) couple them "
                             "(set chunk_head_steps=0)")
        if self.estimator != "trajectory" and self.head_step_weighting != "none":
            raise ValueError("algorithm.head_step_weighting weighs head steps of the trajectory estimator; "
                             f"with algorithm.estimator={self.estimator!r} set it to 'none'")

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(clip_eps=self.clip_eps, dual_clip=self.dual_clip, beta=self.beta, kl=self.kl,
                               normalize=self.normalize, ratio_level=self.ratio_level,
                               score_guidance=self.score_guidance, head_step_weighting=self.head_step_weighting,
                               mte_top_fraction=self.mte_top_fraction if self.mte_k else 0.0,
                               consistency=self.consistency, consistency_start=self.consistency_start,
                               consistency_tau=self.consistency_tau, estimator=self.estimator,
                               noise_draws=self.noise_draws, nft_beta=self.nft_beta, nft_adv_clip=self.nft_adv_clip,
                               nft_weighting=self.nft_weighting, chunk_head_steps=self.chunk_head_steps)


@dataclass
class OptimSection:
    """The optimizer: AdamW, or SGD with momentum `beta1`, with gradient clipping and an LR schedule."""

    name: str = option("adamw", "adamw or sgd (momentum beta1; beta2 unused)", choices=("adamw", "sgd"))
    lr: float = option(1e-4, "peak learning rate", range=(0.0, 10.0))
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW) or L2 (SGD)", range=(0.0, 10.0))
    beta1: float = option(0.9, "Adam's first-moment decay, or SGD's momentum", range=(0.0, 1.0))
    beta2: float = option(0.999, "Adam's second-moment decay", range=(0.0, 1.0))
    grad_clip: float = option(1.0, "max global gradient norm (0 = no clipping)", range=(0.0, None))
    warmup_steps: int = option(0, "linear warm-up steps", range=(0, None))
    schedule: str = option("constant", "after warm-up: constant, or cosine decay to 0 at `steps`",
                           choices=("constant", "cosine"))


@dataclass
class PromptSection:
    """Where training prompts come from: the shapes world's train split, or a prompt file."""

    source: str = option("shapes", "shapes, or a prompt file: GenEval metadata JSONL, T2I-R1 JSONL, JSONL with a "
                         "'prompt' key, or text")
    categories: list[str] | None = option(None, "restrict the shapes world to these categories")
    fixed: list[str] | None = option(None, "train on exactly these prompts (positive controls, debugging)")
    balance_categories: bool = option(True, "draw a category uniformly, then a prompt of it (the shapes train split "
                                      "is 80% position prompts)")


@dataclass
class LogSection:
    """What the run directory receives, and how often."""

    log_every: int = option(1, "steps between metrics.jsonl / TensorBoard rows", range=(1, None))
    sample_every: int = option(10, "steps between sample grids (samples/step-N.png)", range=(1, None))
    checkpoint_every: int = option(10, "steps between checkpoints", range=(1, None))
    keep_checkpoints: int = option(2, "checkpoints kept (older ones are deleted)", range=(1, None))
    tensorboard: bool = option(True, "also write TensorBoard events")
    wandb: bool = option(False, "also log the metrics.jsonl rows to Weights & Biases (rank 0 only; pip install wandb)")
    wandb_project: str = option("margrpo", "W&B project")
    wandb_run_name: str | None = option(None, "W&B run name (null = the run directory's name)")
    wandb_mode: str = option("online", "W&B mode: online, offline (no network; `wandb sync` later) or disabled",
                             choices=("online", "offline", "disabled"))
    wandb_dir: str | None = option(None, "where W&B writes its files (null = the run directory)")


@dataclass
class EvalSection:
    """Verifier accuracy of the shapes world during and after training (`margrpo.worlds.shapes.evaluate`).

    The same prompts and seeds at every evaluation, so each change carries a paired standard error against step 0.
    """

    every: int = option(0, "steps between in-loop evaluations, also at step 0 and the end (0 = none; demo and compare "
                        "evaluate themselves)", range=(0, None))
    per_category: int = option(64, "images per category (held-out prompts cycled in order)", range=(1, None))
    seed: int = option(1234, "seed of the evaluation images")
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
    """Which steps count as bad, and how many in a row stop a run (docs/failures.md).

    A step is bad when a loss, the gradient norm or a rollout's tokens or log-probabilities are not finite, or the
    KL / the largest PPO log-ratio exceed the bounds; it is skipped with weights, optimizer and EMA restored.
    Non-finite rewards are handled per image by the rewards' validity masks and `max_reward_failure_fraction`.
    """

    max_consecutive: int = option(3, "bad steps in a row that stop the run (with a checkpoint of the last good "
                                  "weights)", range=(1, None))
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
    sampling: SamplingSection = option(factory=SamplingSection, help="rollouts")
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

    def eval_sampler(self) -> SamplerConfig:
        """Evaluation samples with the training sampler's settings (what RL optimised), without recording."""
        s = self.sampling
        return SamplerConfig(num_ar_steps=s.ar_steps, num_diffusion_steps=s.diffusion_steps,
                             guidance_scale=s.guidance_scale, guidance_schedule=s.guidance_schedule,
                             temperature=s.temperature, record=False, compile=s.compile)

    def sampler(self, record_steps: tuple[int, ...] | None, branch_step: int | None = None,
                head_steps: dict[int, list[int]] | None = None) -> SamplerConfig:
        """The rollout sampler: records `record_steps`, and MTE log-probabilities at the scored `head_steps`."""
        a, s = self.algorithm, self.sampling
        mte_head_steps = None if head_steps is None else {i: tuple(v) for i, v in head_steps.items()}
        return SamplerConfig(num_ar_steps=s.ar_steps, num_diffusion_steps=s.diffusion_steps,
                             guidance_scale=s.guidance_scale, guidance_schedule=s.guidance_schedule,
                             temperature=s.temperature,
                             policy_tokens=a.policy_tokens,
                             record=True, record_steps=record_steps, record_z=False, mte_k=a.mte_k,
                             mte_source=a.mte_source, mte_top_fraction=a.mte_top_fraction,
                             mte_head_steps=mte_head_steps,
                             score_guidance=a.score_guidance,
                             noise_group=a.group_size if branch_step is not None else 1, branch_step=branch_step,
                             batch_mte_chains=s.batch_mte_chains, compile=s.compile)
