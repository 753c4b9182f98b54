"""The MAR sampling loop that records rollouts.

One loop serves every model family: it sees only the `Policy` interface (`models/base.py`): the policy module
itself, `policy(tokens, mask, cond, drop)` -> z, its head module, `policy.head(x, j, z, ...)` -> the step's
Gaussian, and `policy.sample_orders` / `policy.mask_schedule` for the generation order and the AR schedule.
`guided_z` (here) and the head's `score_transitions` are shared with the loss (`rl/loss.py`), which
recomputes the same quantities for the trainer: using the same code (same batch layout for guidance) is what makes
the recomputed log-probabilities equal to the recorded ones; the MTE chains are drawn and recorded by `mte.py`.

All randomness comes from explicit `torch.Generator`s: `generator` for the orders and the main
head noise, `mte_generator` for the extra multi-trajectory-expectation chains (so that switching
MTE on does not change the images).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from margrpo.models.ar_schedule import guidance_at_step
from margrpo.models.base import Policy
from margrpo.models.conditioning import Condition
from margrpo.models.heads import DiffusionHead, check_finite, split_noise
from margrpo.sampling.config import RecordPlan, SamplerConfig
from margrpo.sampling.mte import record_mte, token_uncertainty, top_fraction_mask
from margrpo.sampling.rollout import ARStepRecord, Rollout


def guided_z(policy: Policy, tokens: torch.Tensor, mask: torch.Tensor,
             cond: Condition | None, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z for the conditional branch and (when guided) the unconditional one, in one batched call.

    The unconditional rows use the same canvas and mask as the conditional ones (upstream duplicates
    the batch), selected through `drop` so that both branches share one forward pass.
    """
    if not guided:
        return policy(tokens, mask, cond), None
    b = tokens.shape[0]
    if cond is None:
        z = policy(tokens, mask, None)
        return z, z
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(tokens.device)
    z = policy(torch.cat([tokens, tokens]), torch.cat([mask, mask]), type(cond).cat([cond, cond]), drop)
    return z[:b], z[b:]


def _extra_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """An independent stream for the noise of diffused-but-not-committed tokens, seeded from `generator`."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(generator.initial_seed())))
    return torch.Generator(device=generator.device).manual_seed(seed ^ 0x5DEECE66D)


def _flat_positions(orders: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Flat indices into [B * L] of the positions orders[:, lo:hi], ascending per row, rows in order: the rows a
    boolean mask of those positions selects, in the same order, found without a host sync."""
    b, seq_len = orders.shape
    pos = orders[:, lo:hi].sort(dim=1).values
    return (torch.arange(b, device=orders.device)[:, None] * seq_len + pos).reshape(-1)


def _mask_by_order(mask_len: int, orders: torch.Tensor) -> torch.Tensor:
    """Keep the first `mask_len` positions of each order masked (LTH14 `mask_by_order`)."""
    out = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    out.scatter_(1, orders[:, :mask_len], True)
    return out


@torch.no_grad()
def sample(policy: Policy, cond: Condition | None, batch_size: int, config: SamplerConfig,
           generator: torch.Generator | None = None, mte_generator: torch.Generator | None = None,
           progress: bool = False, record: RecordPlan | None = None) -> Rollout:
    """Generate `batch_size` token canvases (one per row of `cond`); with a `record` plan, record the rollout.

    The policy is put in eval mode for the duration (dropout off), as the loss's recomputation is.
    """
    if cond is not None and len(cond) != batch_size:
        raise ValueError(f"condition batch {len(cond)} != batch_size {batch_size}")
    if isinstance(cond, torch.Tensor):
        cond = Condition(labels=cond)
    cond = cond.detach() if cond is not None else None  # the rollout stores data, never an autograd graph
    was_training = policy.training
    policy.eval()
    head: DiffusionHead = policy.head
    if config.diffusion_steps is not None and config.diffusion_steps != head.num_steps:
        head.set_sampling_steps(config.diffusion_steps)
    extra_generator = _extra_generator(generator)
    device = next(policy.parameters()).device
    seq_len, c = policy.seq_len, policy.token_embed_dim
    schedule = config.guidance_schedule or policy.default_guidance_schedule
    # the policy's AR schedule: at most `ar_steps` steps (NOVA's drops the ones that would predict nothing)
    counts = policy.mask_schedule(config.ar_steps, seq_len)
    n_steps = len(counts)
    if not 1 <= n_steps <= config.ar_steps or sum(counts) != seq_len or min(counts) < 1:
        raise ValueError(f"{type(policy).__name__}.mask_schedule({config.ar_steps}, {seq_len}) gave {counts}: "
                         f"it must give 1 to {config.ar_steps} counts >= 1 that sum to {seq_len}")
    orders = policy.sample_orders(batch_size, generator, device)
    tokens = torch.zeros(batch_size, seq_len, c, device=device)
    known = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
    plan = record if record is not None else RecordPlan()
    recorded_steps = set() if record is None else set(range(n_steps) if plan.steps is None else plan.steps)
    mte_k = plan.mte_k if record is not None else 0
    steps: dict[int, ARStepRecord] = {}
    # the release's uncertainty comes from K chains under each token's committing condition ("commit"); "bridge"
    # ranks the tokens the same way and then scores K bridges to their committed values instead of those chains
    need_commit_z = mte_k > 0 and plan.mte_source in ("commit", "bridge")
    scoring: dict[int, tuple[torch.Tensor, torch.Tensor | None, float]] = {}
    z_commit = z_u_commit = guidance_commit = None
    if need_commit_z:
        guidance_commit = torch.ones(batch_size, seq_len, 1, device=device)

    finite: list[torch.Tensor] = []
    flat_b = batch_size * seq_len
    still = seq_len
    for i in tqdm(range(n_steps), desc="AR steps", disable=not progress, leave=False):
        mask = (~known).float()
        mask_len = still - counts[i]  # tokens still unknown after this step
        to_pred = ~known & ~_mask_by_order(mask_len, orders)
        # the linear guidance schedule reads upstream's clamped count, which is 1 (not 0) after the last step
        guidance = (guidance_at_step(config.guidance_scale, schedule, seq_len, max(1, mask_len))
                    if config.guided else 1.0)
        z_c, z_u = guided_z(policy, tokens, mask, cond, config.guided)
        recorded = i in recorded_steps
        # all unknown tokens are diffused only where the step is recorded (the consistency mask needs them)
        diffuse_all = plan.policy_tokens != "committed" and recorded
        diffused = ~known if diffuse_all else to_pred
        # the selected rows by index (ascending positions per image, as the boolean masks select them): the
        # counts come from the schedule, so no step reads a tensor back to the host
        flat_pred = _flat_positions(orders, mask_len, still)
        all_committed = not diffuse_all or mask_len == 0
        flat_diff = flat_pred if all_committed else _flat_positions(orders, 0, still)
        d = z_c.shape[-1]
        zc_sel = z_c.reshape(flat_b, d)[flat_diff]
        zu_sel = z_u.reshape(flat_b, d)[flat_diff] if z_u is not None else None
        committed = to_pred.reshape(-1)[flat_diff]
        noise_fn = None if all_committed else split_noise(committed, head.token_dim, generator, extra_generator,
                                                          batch_size * counts[i])
        x_final, traj = head.sample_chain(zc_sel, zu_sel, guidance, config.temperature, generator, recorded, noise_fn,
                                          finite)
        canvas_before = tokens.clone() if recorded else None
        x_commit = x_final if all_committed else x_final[torch.argsort((~committed).to(torch.int8),
                                                                       stable=True)[:batch_size * counts[i]]]
        tokens.view(flat_b, c)[flat_pred] = x_commit.to(tokens.dtype)
        if need_commit_z:
            if z_commit is None:
                z_commit = torch.zeros_like(z_c)
                z_u_commit = torch.zeros_like(z_c) if z_u is not None else None
            z_commit.view(flat_b, d)[flat_pred] = z_c.reshape(flat_b, d)[flat_pred]
            if z_u is not None:
                z_u_commit.view(flat_b, d)[flat_pred] = z_u.reshape(flat_b, d)[flat_pred]
            guidance_commit.view(flat_b, 1)[flat_pred] = guidance
        if recorded:
            # the z the loss scores this step's transitions under (the sampling ones, or cond-only)
            scoring[i] = (zc_sel, zu_sel, guidance) if plan.score_guidance == "rollout" else (zc_sel, None, 1.0)
            logp_cond = None
            if config.guided and plan.score_guidance == "cond_only":
                logp_cond = torch.zeros_like(traj["logp"])
                js = [j for j in range(head.num_steps) if head.is_stochastic(j)]
                logp_cond[js] = head.score_transitions(traj["x"], js, zc_sel, None, 1.0, config.temperature).logp
            steps[i] = ARStepRecord(
                ar_step=i, known=known.clone(), to_pred=to_pred.clone(), diffused=diffused.clone(),
                canvas=canvas_before, guidance=float(guidance), x=traj["x"], logp=traj["logp"], logp_cond=logp_cond,
                z=z_c.clone() if plan.record_z else None,
                z_uncond=z_u.clone() if (plan.record_z and z_u is not None) else None)
            if mte_k > 0 and plan.mte_source == "scored":
                chains = head.sample_chains(zc_sel, zu_sel, guidance, config.temperature, mte_generator, mte_k, finite)
                uncertain = top_fraction_mask(token_uncertainty(chains[:, -1]).reshape(batch_size, -1),
                                              plan.mte_top_fraction).reshape(-1)
                record_mte(steps[i], head, chains, uncertain, scoring[i], plan, config.temperature)
        known = known | to_pred
        still -= counts[i]

    if need_commit_z:  # K extra chains per token under the z (and guidance) of the step that committed it
        d = z_commit.shape[-1]
        zu_commit = z_u_commit.reshape(flat_b, d) if z_u_commit is not None else None
        chains = head.sample_chains(z_commit.reshape(flat_b, d), zu_commit, guidance_commit.reshape(flat_b, 1),
                                    config.temperature, mte_generator, mte_k, finite)
        # uncertainty per image over all its tokens (the reference code's), then each step's share of them
        uncertain = top_fraction_mask(token_uncertainty(chains[:, -1]).reshape(batch_size, -1),
                                      plan.mte_top_fraction).reshape(-1)
        if plan.mte_source == "bridge":
            chains = head.bridge_chains(tokens.reshape(flat_b, c), mte_k, config.temperature, mte_generator)
        for i, r in steps.items():
            flat = r.diffused.reshape(-1).nonzero().flatten()
            record_mte(r, head, chains[:, :, flat], uncertain[flat], scoring[i], plan, config.temperature)
    check_finite(finite)
    if was_training:
        policy.train()
    return Rollout(cond=cond, orders=orders, counts=counts, tokens=tokens, steps=steps, head_steps=head.num_steps,
                   guidance_scale=config.guidance_scale, guidance_schedule=schedule,
                   temperature=config.temperature, policy_tokens=plan.policy_tokens,
                   mte_source=plan.mte_source if mte_k else None)
