"""`margrpo diagnose`: where the policy gradient of one rollout comes from, head step by head step.

For one rollout of a training config (every AR step recorded, every stochastic head step scored) it reports per
head step j:

* `score_gain`: `DiffusionHead.score_gain(j)`, standard deviations the step's mean moves per unit of network
  output: the factor by which the step's sampling noise enters its score term;
* `clamped`: the share of elements whose predicted x0 hits the DDPM head's clamp (their mean, and so their
  score, does not depend on the network: no gradient);
* `grad_share`: the step's share of the squared norm of the policy-term gradient (each step's gradient taken
  alone, on the same rollout and advantages);
* `max_log_ratio`: the largest |log rho| of the step's elements after one optimizer step (the configured
  optimizer and learning rate) along the gradient of all steps together: what PPO's clip then has to absorb;
* `scored`: whether the config's `algorithm.head_step_max_gain` lets the trainer score the step.

Why: a step whose score term is mostly noise can hold most of the gradient's norm and make the PPO ratio explode
(measured on the shipped base: the first respaced cosine DDPM step, alpha-bar about 2.4e-9). This is the tool to
see that on one's own model before choosing what to score.

`gradient_agreement` answers the next question, whether the reward gives the estimator any signal at the batch
size: the mean cosine between the policy gradients of independent rollout batches (0 when each batch's gradient is
noise, 1 when all agree), and the cosine between the means of two halves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from margrpo.rl.advantages import group_advantages
from margrpo.rl.config import TrainConfig
from margrpo.rl.loss import ar_step_loss, replay_transitions, step_z
from margrpo.rl.selection import scorable_head_steps, scored_guidance
from margrpo.rl.trainer import Trainer
from margrpo.sampling.config import RecordPlan
from margrpo.sampling.sampler import sample
from margrpo.utils.rng import make_generator


def head_step_diagnostics(cfg: TrainConfig, step: int = 0) -> list[dict]:
    """Per-head-step figures (see the module docstring) for rollout `step` of the config's run."""
    a = cfg.algorithm
    cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(a, beta=0.0, ptx_weight=0.0, mte_k=0))
    tr = Trainer(cfg, progress=False)
    policy, head = tr.model.policy, tr.model.head
    n_ar = len(policy.mask_schedule(cfg.sampling.ar_steps))
    prompts, meta = tr.prompts.batch(step, a.prompts_per_step)
    cond = tr.model.encode_prompts(prompts)
    cond = cond.repeat_interleave(a.group_size) if cond is not None else None
    n = a.prompts_per_step * a.group_size
    plan = RecordPlan(steps=tuple(range(n_ar)), policy_tokens=a.policy_tokens, score_guidance=a.score_guidance)
    rollout = sample(policy, cond, n, cfg.sampling, make_generator(cfg.seed, "rollout", 0, step, device=tr.device),
                     record=plan)
    rollout.group = torch.arange(a.prompts_per_step).repeat_interleave(a.group_size)
    images = tr.model.decode(rollout.tokens).float()
    out = tr.reward(images, [p for p in prompts for _ in range(a.group_size)],
                    [m for m in meta for _ in range(a.group_size)])
    adv = group_advantages(torch.nan_to_num(out.scores), rollout.group, out.valid, a.advantage_std)
    stochastic = [j for j in range(head.num_steps) if head.is_stochastic(j)]
    gain_args = (scored_guidance(cfg), cfg.sampling.temperature)
    scored = set(scorable_head_steps(head, a.head_step_max_gain, *gain_args)) if stochastic else set()
    params = [p for _, p in tr.params]

    def policy_grad(js: list[int]) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        for i in range(n_ar):
            sl = ar_step_loss(policy, None, rollout, i, js, adv.values, adv.use, cfg.algorithm, {}, first_epoch=True)
            (sl.loss / n_ar).backward()
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    sq = {j: float(sum((g.double() ** 2).sum() for g in policy_grad([j]))) for j in stochastic}
    total = sum(sq.values()) or 1.0
    # one optimizer step along the gradient of all steps, then the log-ratio of every step's elements
    before = {n_: p.detach().clone() for n_, p in tr.params}
    grads = policy_grad(stochastic)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    tr.state.opt.step()  # the diagnostic's own trainer: its optimizer state is thrown away with it
    rows = []
    with torch.no_grad():
        for j in stochastic:
            log_ratio, clamped, count = 0.0, 0.0, 0
            for i, rec in rollout.steps.items():
                sc = step_z(policy, rollout, i, a.score_guidance)
                new = replay_transitions(head, rec.x, [j], sc, rollout.temperature)
                log_ratio = max(log_ratio, float((new.logp - rec.logp[[j]]).abs().max()))
                clamped += float(_clamped_fraction(head, rec.x[j], j, sc)) * rec.x.shape[1]
                count += rec.x.shape[1]
            rows.append({"head_step": j, "score_gain": head.score_gain(j, *gain_args),
                         "clamped": clamped / max(count, 1), "grad_share": sq[j] / total,
                         "max_log_ratio": log_ratio, "scored": j in scored})
        for name_, p in tr.params:
            p.copy_(before[name_])
    return rows


def gradient_agreement(cfg: TrainConfig, batches: int, first_step: int = 1000) -> dict[str, float]:
    """Policy gradients of `batches` independent rollouts (steps first_step, first_step + 1, ...; one PPO epoch, no
    ptx, no KL, no update): their mean pairwise cosine with its standard error, and the cosine of the two halves'
    means (signal grows with the number of images averaged, noise does not)."""
    if batches < 4:
        raise ValueError(f"gradient agreement needs at least 4 batches, got {batches}")
    a = cfg.algorithm
    cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(a, beta=0.0, ptx_weight=0.0, ppo_epochs=1))
    tr = Trainer(cfg, progress=False)
    grads: list[torch.Tensor] = []

    def capture() -> float:  # stands in for the optimizer step: keep the gradient, move nothing
        g = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for _, p in tr.params])
        grads.append(g.double())
        tr.state.opt.zero_grad(set_to_none=True)
        return float(g.norm())

    tr._optimizer_step = capture
    for k in range(batches):
        tr.train_step(first_step + k)
    return {"images_per_batch": a.prompts_per_step * a.group_size, **agreement_statistics(torch.stack(grads))}


def agreement_statistics(g: torch.Tensor) -> dict[str, float]:
    """For gradients g [n, P]: mean pairwise cosine (and its s.e.), cosine of the two halves' means, mean norm."""
    n = g.shape[0]
    unit = g / g.norm(dim=1, keepdim=True).clamp(min=1e-30)
    cos = (unit @ unit.T)[torch.triu_indices(n, n, 1).unbind()]
    half = n // 2
    halves = torch.nn.functional.cosine_similarity(g[:half].mean(0), g[half:].mean(0), dim=0)
    return {"batches": n, "mean_pair_cosine": float(cos.mean()), "pair_cosine_se": float(cos.std() / len(cos) ** 0.5),
            "halves_cosine": float(halves), "grad_norm": float(g.norm(dim=1).mean())}


def _clamped_fraction(head: torch.nn.Module, x: torch.Tensor, j: int, sc) -> float:
    """Share of elements whose predicted x0 the head clamps at step j (0 for heads that do not clamp)."""
    tr = head.transition(x, j, sc.z, sc.z_uncond, sc.guidance if sc.z_uncond is not None else 1.0)
    return 0.0 if tr.clamped is None else float(tr.clamped.float().mean())


def format_table(rows: list[dict]) -> str:
    lines = ["| head step | score gain | x0 clamped | gradient share | max log-ratio after one step | scored |",
             "|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['head_step']} | {r['score_gain']:.3g} | {100 * r['clamped']:.1f}% | "
                     f"{100 * r['grad_share']:.1f}% | {r['max_log_ratio']:.3g} | {'yes' if r['scored'] else 'no'} |")
    return "\n".join(lines)


def run_diagnose(cfg: TrainConfig, out: Path | None = None, step: int = 0, agreement: int = 0) -> dict:
    result: dict = {"config": cfg.model, "rows": head_step_diagnostics(cfg, step)}
    table = format_table(result["rows"])
    if agreement:
        ag = result["agreement"] = gradient_agreement(cfg, agreement)
        table += (f"\n\nGradient agreement over {ag['batches']} batches of {ag['images_per_batch']} images: mean "
                  f"pairwise cosine {ag['mean_pair_cosine']:.3f} ± {ag['pair_cosine_se']:.3f}, halves' means "
                  f"{ag['halves_cosine']:.3f}, grad norm {ag['grad_norm']:.3g}")
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
    return result
