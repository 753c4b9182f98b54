"""Where the shapes verifier's signal comes from, on the shipped base (docs/findings/2026-12-07-verifier-signal.md).

    python tools/verifier_signal.py variance [--prompts 12] [--group 16] [--temperature 1]
    python tools/verifier_signal.py step-temperature [--per-category 100]
    python tools/verifier_signal.py agreement [--batches 8] [--prompts 16] [--temperature 0.5] [--null]
    python tools/verifier_signal.py mte-gradient [--redraws 256]

* `variance`: the within-group variance of the reward (strict and partial) when the group's images share their
  generation order and every token committed before AR step i (drawn once) and draw the rest independently, for
  i = 0..N-1. E[Var(R | tokens before step i)] falls as i grows; its drop at step i is the share of the reward's
  variance that step i's tokens decide (the Doob decomposition over AR steps), per category.
* `step-temperature`: held-out strict accuracy of the base with temperature 0.5 at some AR steps and 1 at the others:
  which steps the cooler sampler's gain comes from.
* `agreement`: the matching (final-value) policy gradient of independent rollout batches, split by AR step and by
  token group (the tokens the step commits; the still-unknown ones), and their mean pairwise cosine; `--null`
  shuffles each group's rewards among its images (a reward with no information: the cosines must vanish).
* `mte-gradient`: on one rollout (AR step 3, the 30% most uncertain tokens), the gradient in z of the MTE term
  averaged over M redraws of its K = 4 chains, for chains drawn under the scored z, under each token's
  committing z (the MAR-GRPO release) and bridges to the committed value; against the main trajectory's
  term and the matching gradient. A zero-mean term's average falls as 1 / sqrt(M).

Deterministic from the seeds on one thread; prints tables and writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from margrpo.models.heads import DiffusionHead
from margrpo.models.loading import load_model
from margrpo.rl.advantages import group_advantages
from margrpo.rl.diagnose import agreement_statistics
from margrpo.rl.loss import step_z
from margrpo.rl.loss_terms import stratified_denoising_loss, stratified_uniform
from margrpo.sampling.config import RecordPlan, SamplerConfig
from margrpo.sampling.mte import token_uncertainty, top_fraction_mask
from margrpo.sampling.sampler import sample
from margrpo.utils.rng import make_generator
from margrpo.worlds import shapes
from margrpo.worlds.shapes.evaluate import eval_set

CATEGORIES = list(shapes.CATEGORIES)


class _Instrumented:
    """The policy as the sampler sees it, with two diagnostics the sampler itself has no option for: groups of
    `group` consecutive images share their order and every head draw of the first `shared_steps` AR steps (so
    their tokens before that step are equal, as the same prefix drawn once), and the head samples AR step i at
    `step_temperatures[i]` times the sampler's temperature. The sampler calls the policy once per AR step, which
    is how the wrapper counts them. Everything else is delegated: the images are the sampler's own."""

    def __init__(self, policy, group: int = 1, shared_steps: int = 0, step_temperatures=None):
        self._policy, self._group, self._shared = policy, group, shared_steps
        self._temps = step_temperatures
        self._step = -1
        self.head = _InstrumentedHead(policy.head, self)

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def __call__(self, *args, **kwargs):
        self._step += 1
        return self._policy(*args, **kwargs)

    def sample_orders(self, bsz, generator=None, device="cpu"):
        self.n_groups = bsz // self._group
        return self._policy.sample_orders(self.n_groups, generator, device).repeat_interleave(self._group, 0)

    def shared(self) -> bool:
        return self._step < self._shared and self._group > 1


class _InstrumentedHead:
    def __init__(self, head, owner: _Instrumented):
        self._head, self._owner = head, owner

    def __getattr__(self, name):
        return getattr(self._head, name)

    def __call__(self, x, j, z, z_uncond=None, guidance=1.0, temperature=1.0):
        temps = self._owner._temps
        scale = temps[self._owner._step] if temps is not None else 1.0
        return self._head(x, j, z, z_uncond, guidance, temperature * scale)

    def _draw(self, shape, generator, device):
        if not self._owner.shared():
            return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        # rows are image-major (each image's tokens in a run): draw the rows of each group's first image, repeat them
        n_groups, g = self._owner.n_groups, self._owner._group
        first = torch.randn((shape[0] // g,) + tuple(shape[1:]), generator=generator, device=device)
        per_image = first.reshape(n_groups, 1, -1, *shape[1:])
        return per_image.expand(n_groups, g, *per_image.shape[2:]).reshape(shape)

    def init_noise(self, shape, generator, device, dtype=torch.float32):
        return self._draw(shape, generator, device).to(dtype)

    def sample_step(self, tr, j, generator, noise=None):
        if noise is None and self._head.is_stochastic(j):
            noise = self._draw(tuple(tr.mean.shape), generator, tr.mean.device)
        return self._head.sample_step(tr, j, generator, noise)

    def sample_chain(self, *args, **kwargs):  # the head's own chain, through this wrapper's call and draws
        return DiffusionHead.sample_chain(self, *args, **kwargs)

    def sample_chains(self, *args, **kwargs):
        return DiffusionHead.sample_chains(self, *args, **kwargs)


def _train_prompts(per_category: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    prompts, cats = [], []
    for c in CATEGORIES:
        pool = shapes.train_prompts(c)
        prompts += [pool[i] for i in rng.choice(len(pool), per_category, replace=False)]
        cats += [c] * per_category
    return prompts, cats


def _scores(model, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    res = shapes.score_tensors(images, prompts)
    return (torch.tensor([float(r["strict"]) for r in res]), torch.tensor([float(r["partial"]) for r in res]))


def _advantages(reward: torch.Tensor, group: int) -> torch.Tensor:
    """The demo's advantages: centred in each group of `group` consecutive images, over the batch's std."""
    return group_advantages(reward, torch.arange(len(reward)) // group, std="batch").values


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def variance(args) -> dict:
    """E[Var(R | order and the tokens before step i)] per category, for every AR step i."""
    model = load_model("shipped:shapes-base", "cpu")
    policy = model.policy
    prompts, cats = _train_prompts(args.prompts, 3)
    g = args.group
    cfg = SamplerConfig(ar_steps=8, diffusion_steps=10, temperature=args.temperature)
    n_steps = len(policy.mask_schedule(cfg.ar_steps))
    out = {}
    for prefix in range(n_steps):
        strict, partial = [], []
        for k in range(0, len(prompts), 4):
            chunk = prompts[k:k + 4]
            cond = model.encode_prompts(chunk).repeat_interleave(g)
            r = sample(_Instrumented(policy, g, prefix), cond, len(chunk) * g, cfg, make_generator(0, "variance", k))
            s, p = _scores(model, model.decode(r.tokens).float(), [q for q in chunk for _ in range(g)])
            strict.append(s.reshape(-1, g))
            partial.append(p.reshape(-1, g))
        s, p = torch.cat(strict), torch.cat(partial)
        row = {}
        for c in [*CATEGORIES, "all"]:
            idx = [i for i, cc in enumerate(cats) if c in ("all", cc)]
            row[c] = {"strict": float(s[idx].var(dim=1).mean()), "partial": float(p[idx].var(dim=1).mean()),
                      "accuracy": float(s[idx].mean())}
        out[prefix] = row
        print(f"tokens before AR step {prefix} shared: " + "  ".join(
            f"{c} {row[c]['partial']:.4f}/{row[c]['strict']:.3f}" for c in [*CATEGORIES, "all"]), flush=True)
    out[n_steps] = {c: {"strict": 0.0, "partial": 0.0} for c in [*CATEGORIES, "all"]}  # all shared: no variance
    print("\nshare of the partial reward's within-group variance decided by each AR step's tokens:")
    total = out[0]
    for i in range(n_steps):
        print(f"AR step {i} ({policy.mask_schedule(cfg.ar_steps)[i]} tokens): " + "  ".join(
            f"{c} {(out[i][c]['partial'] - out[i + 1][c]['partial']) / max(total[c]['partial'], 1e-12):.0%}"
            for c in [*CATEGORIES, "all"]))
    return out


def step_temperature(args) -> dict:
    model = load_model("shipped:shapes-base", "cpu")
    ev = eval_set("heldout", args.per_category)
    schedules = {"t=1 everywhere": [1.0] * 8, "0.5 at the last step": [1.0] * 7 + [0.5],
                 "0.5 at the last 3 steps": [1.0] * 5 + [0.5] * 3, "0.5 at the first 3 steps": [0.5] * 3 + [1.0] * 5,
                 "0.5 at the first 5 steps": [0.5] * 5 + [1.0] * 3, "0.5 everywhere": [0.5] * 8}
    out = {}
    for name, temps in schedules.items():
        cfg = SamplerConfig(ar_steps=8, diffusion_steps=10)
        results = []
        for k in range(0, len(ev.prompts), 100):
            chunk = list(ev.prompts[k:k + 100])
            r = sample(_Instrumented(model.policy, step_temperatures=temps), model.encode_prompts(chunk), len(chunk),
                       cfg, make_generator(ev.seed, "eval", k))
            results += shapes.score_tensors(model.decode(r.tokens).float(), chunk)
        out[name] = {c: v["strict"] for c, v in shapes.summarize(results).items()}
        print(f"{name:26s} " + "  ".join(f"{c} {100 * v:.1f}%" for c, v in out[name].items()), flush=True)
    return out


def agreement(args) -> dict:
    model = load_model("shipped:shapes-base", "cpu")
    policy, head = model.policy, model.policy.head
    head.set_sampling_steps(10)
    params = [p for n, p in policy.named_parameters() if not n.startswith("head.") and p.requires_grad]
    g, draws = 8, 4
    grads: dict[str, list[torch.Tensor]] = {}
    for b in range(args.batches):
        prompts, _ = _train_prompts(args.prompts // 4, 100 + b)
        cond = model.encode_prompts(prompts).repeat_interleave(g)
        n_img = len(prompts) * g
        r = sample(policy, cond, n_img, SamplerConfig(ar_steps=8, diffusion_steps=10, temperature=args.temperature),
                   make_generator(5, "agree", b), record=RecordPlan(policy_tokens="unknown"))
        _, reward = _scores(model, model.decode(r.tokens).float(), [p for p in prompts for _ in range(g)])
        if args.null:  # no information: each group's rewards shuffled among its images
            perm = torch.argsort(torch.rand(n_img // g, g, generator=torch.Generator().manual_seed(b)), dim=1)
            reward = torch.gather(reward.reshape(-1, g), 1, perm).reshape(-1)
        adv = _advantages(reward, g)
        for i, rec in r.steps.items():
            n = int(rec.diffused.sum())
            a = adv.repeat_interleave(n // n_img)
            committed = rec.committed_in_diffused()
            z = step_z(policy, r, i).z
            loss = stratified_denoising_loss(head, r.tokens[rec.diffused], z, draws,
                                             make_generator(5, "draws", b, i)).mean(0)
            for group, mask in (("committed", committed), ("unknown", ~committed)):
                if bool(mask.any()):
                    gr = torch.autograd.grad((a * loss * mask.float()).sum() / n_img, params, retain_graph=True,
                                             allow_unused=True)
                    flat = [(x if x is not None else torch.zeros_like(p)).reshape(-1)
                            for x, p in zip(gr, params, strict=True)]
                    grads.setdefault(f"{i}/{group}", []).append(torch.cat(flat))
        print(f"batch {b + 1}/{args.batches}", flush=True)
    grads["all"] = [sum(grads[k][b] for k in grads) for b in range(args.batches)]
    out = {k: agreement_statistics(torch.stack(v)) for k, v in grads.items()}
    for k, v in out.items():
        print(f"{k:12s} pairwise cosine {v['mean_pair_cosine']:+.3f} ± {v['pair_cosine_se']:.3f}  "
              f"halves {v['halves_cosine']:+.2f}  norm {v['grad_norm']:.3g}")
    return out


def mte_gradient(args) -> dict:
    model = load_model("shipped:shapes-base", "cpu")
    policy, head = model.policy, model.policy.head
    head.set_sampling_steps(10)
    prompts = ["a red square left of a blue circle", "a green circle and a yellow triangle", "three orange squares",
               "a blue triangle"]
    g, k_chains, step = 8, 4, 3
    n_img = len(prompts) * g
    r = sample(policy, model.encode_prompts(prompts).repeat_interleave(g), n_img,
               SamplerConfig(ar_steps=8, diffusion_steps=10), make_generator(0, "mte-gradient", 0),
               record=RecordPlan(policy_tokens="unknown", record_z=True))
    _, reward = _scores(model, model.decode(r.tokens).float(), [p for p in prompts for _ in range(g)])
    adv = _advantages(reward, g)
    rec = r.steps[step]
    n = int(rec.diffused.sum())
    a = adv.repeat_interleave(n // n_img)
    committed = rec.committed_in_diffused()
    x0 = r.tokens[rec.diffused]
    js = [j for j in range(head.num_steps) if head.is_stochastic(j) and head.unit_score_gain(j) <= 3.0]
    z = step_z(policy, r, step).z.detach().clone().requires_grad_(True)
    commit_z = torch.zeros(n_img * policy.seq_len, z.shape[1])
    for s in r.steps.values():
        sel = s.to_pred.reshape(-1)
        commit_z[sel] = s.z.reshape(-1, z.shape[1])[sel]
    z_commit = commit_z[rec.diffused.reshape(-1)]

    def grad(value) -> torch.Tensor:
        (gz,) = torch.autograd.grad(value, z)
        return gz

    def chains_logp(chains: torch.Tensor) -> torch.Tensor:  # [K, T+1, N, C] -> [N], mean over K, sum over js / C
        lp = head.score_transitions(chains.transpose(0, 1), js, z).logp  # [J, K, N, C]
        return lp.sum(dim=(0, -1)).mean(0)

    with torch.no_grad():  # the uncertain tokens: spread of K head samples under the scored z
        ranks = torch.stack([head.sample_chain(z.detach(), None, 1.0, 1.0, make_generator(0, "rank", m), False)[0]
                             for m in range(k_chains)])
    uncertain = top_fraction_mask(token_uncertainty(ranks).reshape(n_img, -1), 0.3).reshape(-1)
    out = {}
    for group, mask in (("committed", uncertain & committed), ("unknown", uncertain & ~committed)):
        w = a * mask.float()
        main = grad(-(w * head.score_transitions(rec.x, js, z).logp.sum(dim=(0, -1))).sum())
        # the levels and the noises from two streams, as the figures in the findings were measured
        t = head.loss_noise_levels(stratified_uniform(64, n, make_generator(0, "match", 0), "cpu").reshape(-1))
        matching = grad((w * head.loss(x0.repeat(64, 1), z.repeat(64, 1), generator=make_generator(0, "match", 1),
                                       t=t).reshape(64, n).mean(0)).sum())
        row = {"main_norm": float(main.norm()), "matching_norm": float(matching.norm())}
        for source in ("scored", "commit", "bridge"):
            acc, curve = torch.zeros_like(z), {}
            for m in range(1, args.redraws + 1):
                gen = make_generator(1, source, m)
                with torch.no_grad():
                    if source == "bridge":
                        chains = head.bridge_chains(x0, k_chains, generator=gen)
                    else:
                        chains = head.sample_chains(z.detach() if source == "scored" else z_commit, None, 1.0, 1.0,
                                                    gen, k_chains)
                acc += grad(-(w * chains_logp(chains)).sum())
                if m in (1, 4, 16, 64, 256, 1024):
                    mean = acc / m
                    curve[m] = {"norm": float(mean.norm()), "cos_main": _cosine(mean, main),
                                "cos_matching": _cosine(mean, matching)}
            row[source] = curve
            print(f"{group:9s} {source:6s} " + "  ".join(
                f"M={m}: {v['norm']:.3g} (cos main {v['cos_main']:+.2f}, matching {v['cos_matching']:+.2f})"
                for m, v in curve.items()), flush=True)
        out[group] = row
    return out


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("variance")
    p.add_argument("--prompts", type=int, default=12, help="training prompts per category")
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p = sub.add_parser("step-temperature")
    p.add_argument("--per-category", type=int, default=100)
    p = sub.add_parser("agreement")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16, help="prompts per batch (8 images each)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--null", action="store_true", help="shuffle each group's rewards (a reward with no information)")
    p = sub.add_parser("mte-gradient")
    p.add_argument("--redraws", type=int, default=256)
    for p in sub.choices.values():
        p.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    out = {"variance": variance, "step-temperature": step_temperature, "agreement": agreement,
           "mte-gradient": mte_gradient}[args.command](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
