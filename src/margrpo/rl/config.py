"""Training configuration: YAML + dotted overrides, validated by `margrpo.utils.config`.

Presets are YAML files (`configs/presets/grpo.yaml`, `configs/presets/mar-grpo.yaml`) that set the
stabiliser switches; a run config names one with `base:`. Plain GRPO and MAR-GRPO therefore run
through exactly the same code with different values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from margrpo.rl.objective import ESTIMATORS, NORMALIZE_MODES, RATIO_LEVELS, ObjectiveConfig
from margrpo.sampling.sampler import SamplerConfig


@dataclass
class SamplingSection:
    """How rollouts are drawn (fewer AR and head steps and no CFG make rollouts cheap)."""

    ar_steps: int = field(default=8, metadata={"range": (1, 4096)})
    diffusion_steps: int = field(default=10, metadata={"range": (1, 1000)})
    cfg: float = field(default=1.0, metadata={"range": (1.0, 50.0)})
    cfg_schedule: str = field(default="linear", metadata={"choices": ("linear", "constant")})
    temperature: float = field(default=1.0, metadata={"range": (0.01, 10.0)})


@dataclass
class AlgorithmSection:
    group_size: int = field(default=8, metadata={"range": (2, 4096)})
    prompts_per_step: int = field(default=4, metadata={"range": (1, 4096)})
    advantage_std: str = field(default="group", metadata={"choices": ("group", "batch", "none")})
    advantage_eps: float = field(default=1e-4, metadata={"range": (0.0, 1.0)})
    ar_step_fraction: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
    ar_step_count: int | None = field(default=None, metadata={"range": (1, 4096)})
    head_steps_per_ar_step: int | None = field(default=None, metadata={"range": (1, 1000)})
    # Head steps whose score gain (DiffusionHead.score_gain: standard deviations the step's mean moves per
    # unit of network output) exceeds this are not scored, in the policy term, MTE or the KL.
    head_step_max_gain: float = field(default=3.0, metadata={"range": (0.0, None)})
    head_step_weighting: str = field(default="none", metadata={"choices": ("none", "std")})
    guidance: str = field(default="rollout", metadata={"choices": ("rollout", "cond_only")})
    clip_eps: float = field(default=0.2, metadata={"range": (0.0, 10.0)})
    dual_clip: float | None = field(default=None, metadata={"range": (1.0, 100.0)})
    ppo_epochs: int = field(default=1, metadata={"range": (1, 100)})
    beta: float = field(default=0.01, metadata={"range": (0.0, 1e6)})
    kl: str = field(default="gaussian", metadata={"choices": ("gaussian", "reference")})
    normalize: str = field(default="element", metadata={"choices": NORMALIZE_MODES})
    ratio_level: str = field(default="element", metadata={"choices": RATIO_LEVELS})
    # Advantages beyond +-advantage_clip are clipped (Flow-GRPO / DanceGRPO / DDPO: 5); null = no clip.
    advantage_clip: float | None = field(default=None, metadata={"range": (1e-6, None)})
    train: str = field(default="ar", metadata={"choices": ("ar", "head", "both")})
    policy_tokens: str = field(default="unknown", metadata={"choices": ("committed", "unknown")})
    mte_k: int = field(default=4, metadata={"range": (0, 64)})
    mte_top_fraction: float = field(default=0.3, metadata={"range": (0.0, 1.0)})
    mte_source: str = field(default="commit", metadata={"choices": ("commit", "scored")})
    consistency: bool = True
    consistency_start: int = field(default=1, metadata={"range": (0, 4096)})
    consistency_tau: float = field(default=0.0, metadata={"range": (-2.0, 2.0)})
    update: str = field(default="rollout", metadata={"choices": ("rollout", "ar_step")})
    # One transformer forward and backward for all scored AR steps of a rollout (their canvases stacked, rows
    # padded to the longest known set) instead of one per step; the same gradient up to float rounding. Needs
    # update='rollout' (one optimizer step per scored AR step cannot share a graph).
    batch_ar_steps: bool = False
    # The policy term: "trajectory" scores the recorded head transitions (GRPO / DDPO, the paper's);
    # "matching" uses minus the head's pretraining loss on each token's final value in the PPO ratio (Advantage
    # Weighted Matching, Xue et al. 2025); "nft" is DiffusionNFT's negative-aware loss on the final value (Zheng
    # et al. 2025, arXiv 2509.16117). The last two are forward-process estimators: `noise_draws` (noise level,
    # noise) draws per token, stratified in noise level, the same in every PPO epoch.
    estimator: str = field(default="trajectory", metadata={"choices": ESTIMATORS})
    noise_draws: int = field(default=4, metadata={"range": (1, 1024)})
    # DiffusionNFT's beta (how far the implicit positive / negative policies extrapolate; the release's 1.0) and
    # A_max, the advantage mapped to r = 1 (the release's adv_clip_max 5).
    nft_beta: float = field(default=1.0, metadata={"range": (1e-6, 100.0)})
    nft_adv_clip: float = field(default=5.0, metadata={"range": (1e-6, 1e6)})
    # "adaptive": each draw's squared error over its detached mean absolute error (the release's, made for x0
    # errors of flow models); "mse": the plain squared error, as the head's pretraining loss weighs its draws.
    nft_weighting: str = field(default="adaptive", metadata={"choices": ("adaptive", "mse")})
    # Branched groups: the G images of a prompt share their order and head noise except at one AR step
    # (drawn per rollout), the only step scored. Reward differences in a group then come from that step's
    # tokens alone instead of from every token of the image. Measured on the shapes base (grpo, Adam 5e-5,
    # 100 steps): no gain, held-out 26.9% vs 25.5% for a random reward, against 28.7% vs 23.2% unbranched.
    branch: bool = False
    # PPO-ptx (InstructGPT): add ptx_weight x the MAR pretraining loss on freshly rendered shapes-world
    # *training* images to every update. The policy gradient's noise walks the weights off the pretraining
    # optimum (measured: a random, information-free reward drops held-out accuracy 29% -> 23% in 100 steps);
    # the pretraining gradient is nearly noise-free and pulls them back. Shapes world only (it needs images).
    ptx_weight: float = field(default=0.0, metadata={"range": (0.0, 1e6)})
    ptx_batch_size: int = field(default=64, metadata={"range": (1, 65536)})

    def __post_init__(self) -> None:
        if self.branch and self.ar_step_count not in (None, 1):
            raise ValueError(f"algorithm.branch scores exactly one AR step (the branch step); got "
                             f"ar_step_count={self.ar_step_count} (leave it unset or 1)")
        if self.batch_ar_steps and self.update != "rollout":
            raise ValueError("algorithm.batch_ar_steps shares one forward between the scored AR steps; with "
                             "algorithm.update='ar_step' every step has its own optimizer step (set update='rollout')")
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
        if self.estimator != "trajectory" and self.head_step_weighting != "none":
            raise ValueError("algorithm.head_step_weighting weighs head steps of the trajectory estimator; "
                             f"with algorithm.estimator={self.estimator!r} set it to 'none'")

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(clip_eps=self.clip_eps, dual_clip=self.dual_clip, beta=self.beta, kl=self.kl,
                               normalize=self.normalize, ratio_level=self.ratio_level,
                               guidance=self.guidance, head_step_weighting=self.head_step_weighting,
                               mte_top_fraction=self.mte_top_fraction if self.mte_k else 0.0,
                               consistency=self.consistency, consistency_start=self.consistency_start,
                               consistency_tau=self.consistency_tau, estimator=self.estimator,
                               noise_draws=self.noise_draws, nft_beta=self.nft_beta, nft_adv_clip=self.nft_adv_clip,
                               nft_weighting=self.nft_weighting)


@dataclass
class OptimSection:
    """`name`: AdamW, or SGD with momentum `beta1` (beta2 then unused).

    Why SGD: Adam moves every coordinate by about lr whatever its share of the gradient, so a noisy
    policy gradient over a small model's 2.5M weights turns into a long random step (L2 ~ lr * sqrt(n)).
    On the shapes base the red-pixel control *fell* 0.07 -> 0.00 in 30 Adam steps at 3e-4 while a step
    along the same gradient's direction raised it 0.09 -> 0.13; SGD follows that direction.
    """

    name: str = field(default="adamw", metadata={"choices": ("adamw", "sgd")})
    lr: float = field(default=1e-4, metadata={"range": (0.0, 10.0)})
    weight_decay: float = field(default=0.0, metadata={"range": (0.0, 10.0)})
    beta1: float = field(default=0.9, metadata={"range": (0.0, 1.0)})
    beta2: float = field(default=0.999, metadata={"range": (0.0, 1.0)})
    grad_clip: float = field(default=1.0, metadata={"range": (0.0, None)})
    warmup_steps: int = field(default=0, metadata={"range": (0, None)})
    schedule: str = field(default="constant", metadata={"choices": ("constant", "cosine")})


@dataclass
class PromptSection:
    """Where training prompts come from: the shapes world's train split, or a prompt file."""

    source: str = "shapes"  # "shapes" or a path to a prompt file (GenEval metadata, T2I-R1, text)
    categories: list[str] | None = None  # restrict the shapes world to these categories
    fixed: list[str] | None = None  # train on exactly these prompts (positive controls, debugging)
    # Draw a category uniformly, then a prompt of it (as pretraining and the held-out evaluation weigh
    # categories); off = uniform over prompts, where the shapes world's train split is 80% position.
    balance_categories: bool = True


@dataclass
class LogSection:
    log_every: int = field(default=1, metadata={"range": (1, None)})
    sample_every: int = field(default=10, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=10, metadata={"range": (1, None)})
    keep_checkpoints: int = field(default=2, metadata={"range": (1, None)})
    tensorboard: bool = True


@dataclass
class EvalSection:
    """Verifier accuracy of the shapes world during and after training (`margrpo.evaluate`).

    Held-out prompts (and, with `in_distribution`, training prompts) are sampled with the training sampler's
    settings and the seed `seed`, the same images at every evaluation, so each change carries a paired standard
    error against step 0. `ema_decay` > 0 also keeps an exponential moving average of the trained weights and
    evaluates it beside them (Flow-GRPO's evaluation EMA).
    """

    every: int = field(default=0, metadata={"range": (0, None)})  # 0: only where a command asks (demo, compare)
    per_category: int = field(default=64, metadata={"range": (1, None)})
    seed: int = 1234
    in_distribution: bool = False
    ema_decay: float = field(default=0.0, metadata={"range": (0.0, 0.999999)})


@dataclass
class FaultSection:
    """Which steps count as bad, and how many in a row stop a run.

    A step is bad when a loss, the gradient norm or a rollout's tokens or log-probabilities are not finite, or
    the KL / the largest PPO log-ratio exceed the bounds below. It is skipped (weights, optimizer and EMA as
    before it, a `fault/skipped` metric and a message naming what and where); after `max_consecutive` bad steps
    in a row the run stops with an error and a checkpoint holding the last good weights. Non-finite rewards are
    handled per image by the rewards' validity masks and the failure guard (`max_reward_failure_fraction`).
    """

    max_consecutive: int = field(default=3, metadata={"range": (1, None)})
    max_kl: float | None = field(default=None, metadata={"range": (0.0, None)})
    max_log_ratio: float | None = field(default=None, metadata={"range": (0.0, None)})


@dataclass
class TrainConfig:
    model: str = "shipped:shapes-base"  # a generator folder, or "shipped:NAME"
    out_dir: str = "runs/train"
    seed: int = 0
    steps: int = field(default=50, metadata={"range": (1, 10_000_000)})
    rewards: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    reward_options: dict[str, dict] = field(default_factory=dict)
    max_reward_failure_fraction: float = field(default=0.1, metadata={"range": (0.0, 1.0)})
    prompts: PromptSection = field(default_factory=PromptSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    optim: OptimSection = field(default_factory=OptimSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    faults: FaultSection = field(default_factory=FaultSection)
    device: str = "cpu"
    autocast: str = field(default="none", metadata={"choices": ("none", "bf16")})
    threads: int = field(default=1, metadata={"range": (0, 256)})

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ValueError("rewards: at least one reward is needed, e.g. {shapes: 1.0}")

    def eval_sampler(self) -> SamplerConfig:
        """Evaluation samples with the training sampler's settings (what RL optimised), without recording."""
        s = self.sampling
        return SamplerConfig(num_ar_steps=s.ar_steps, num_diffusion_steps=s.diffusion_steps, cfg=s.cfg,
                             cfg_schedule=s.cfg_schedule, temperature=s.temperature, record=False)

    def sampler(self, record_steps: tuple[int, ...] | None, branch_step: int | None = None,
                head_steps: dict[int, list[int]] | None = None) -> SamplerConfig:
        """The rollout sampler: records `record_steps`, and MTE log-probabilities at the scored `head_steps`."""
        a, s = self.algorithm, self.sampling
        mte_head_steps = None if head_steps is None else {i: tuple(v) for i, v in head_steps.items()}
        return SamplerConfig(num_ar_steps=s.ar_steps, num_diffusion_steps=s.diffusion_steps, cfg=s.cfg,
                             cfg_schedule=s.cfg_schedule, temperature=s.temperature,
                             diffuse="all_unknown" if a.policy_tokens == "unknown" else "to_predict",
                             record=True, record_steps=record_steps, record_z=False, mte_k=a.mte_k,
                             mte_source=a.mte_source, mte_top_fraction=a.mte_top_fraction,
                             mte_head_steps=mte_head_steps,
                             score_guidance=a.guidance,
                             noise_group=a.group_size if branch_step is not None else 1, branch_step=branch_step)
