"""The sampler: reproducibility from explicit generators, schedules, and the ratio-is-1 invariant."""

import pytest
import torch

from margrpo.models.conditioning import Condition
from margrpo.models.mar import MARPolicy
from margrpo.rl.loss import replay_transitions, step_z
from margrpo.sampling.config import SamplerConfig
from margrpo.sampling.sampler import sample

from conftest import randomize, sampling, tiny_mar_kwargs


def make(head="ddpm", std=0.05):
    return randomize(MARPolicy(**tiny_mar_kwargs(head=head, num_sampling_steps="6")), std=std, seed=1)


def run(model, seed=0, n=4, mte_seed=1, **cfg):
    cond = Condition(labels=torch.arange(n) % 10)
    config, plan = sampling(**cfg)
    return sample(model, cond, n, config, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(mte_seed),
                  record=plan)


def test_same_seed_same_images_bit_for_bit():
    m = make()
    a, b, c = run(m, ar_steps=6), run(m, ar_steps=6), run(m, seed=1, ar_steps=6)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.allclose(a.tokens, c.tokens)


def test_global_rng_is_untouched():
    m = make()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    run(m, ar_steps=4, mte_k=2)
    assert torch.equal(before, torch.get_rng_state())


def test_masks_follow_the_schedule():
    m = make()
    r = run(m, ar_steps=8)
    committed = torch.zeros(4, 64, dtype=torch.bool)
    for i in range(8):
        rec = r.steps[i]
        assert int(rec.to_pred[0].sum()) == r.counts[i]
        assert torch.equal(rec.known, committed)  # known before the step = everything committed earlier
        assert not (rec.to_pred & rec.known).any()
        # LTH14 keeps the first mask_len positions of the order masked, so the order is consumed from its end
        end = 64 - sum(r.counts[:i])
        for b in range(4):
            expected = set(r.orders[b, end - r.counts[i]:end].tolist())
            assert expected == set(rec.to_pred[b].nonzero().flatten().tolist())
        committed |= rec.to_pred
    assert committed.all()
    step_of = sum(i * r.steps[i].to_pred.long() for i in range(8))
    assert torch.equal(r.committed_step(), step_of)
    # the committed values are the final head outputs of that step
    rec = r.steps[3]
    assert torch.equal(r.tokens[rec.to_pred], rec.x[-1][rec.committed_in_diffused()])


def test_unknown_policy_tokens_commit_the_same_positions():
    m = make()
    r = run(m, ar_steps=5, policy_tokens="unknown")
    for rec in r.steps.values():
        assert torch.equal(rec.diffused, ~rec.known)
        assert rec.x.shape[1] == int((~rec.known).sum())


def test_recording_a_subset_of_steps_keeps_the_images():
    m = make()
    full = run(m, ar_steps=6)
    part = run(m, ar_steps=6, steps=(1, 4))
    assert sorted(part.steps) == [1, 4]
    assert torch.equal(full.tokens, part.tokens)
    assert torch.equal(full.steps[4].logp, part.steps[4].logp)


def test_mte_chains_do_not_change_the_images():
    m = make()
    plain = run(m, ar_steps=4)
    commit = run(m, ar_steps=4, mte_k=3, mte_source="commit")
    scored = run(m, ar_steps=4, mte_k=3, mte_source="scored")
    assert torch.equal(plain.tokens, commit.tokens) and torch.equal(plain.tokens, scored.tokens)
    # the rollout keeps the chains of each step's uncertain tokens and their log-probabilities at every stochastic
    # head step; the scored source picks 30% of each image's diffused tokens (at least one) per step
    for r in (commit, scored):
        for rec in r.steps.values():
            n = rec.mte_tokens.shape[0]
            assert rec.mte_x.shape == (3, 7, n, 48) and rec.mte_logp.shape == (3, len(rec.mte_head_steps), n, 48)
            assert not torch.allclose(rec.mte_x[0, -1], rec.mte_x[1, -1])  # K chains differ from each other
    for rec in scored.steps.values():
        assert rec.mte_tokens.shape[0] == 4 * max(1, int(int(rec.diffused.sum()) // 4 * 0.3))
    # the commit source draws each token's chains once, under its committing condition, and picks 30% of each
    # image's 64 tokens: a position selected at two steps has the same chains at both
    chains: dict[int, torch.Tensor] = {}
    repeats = 0
    commit_all = run(m, ar_steps=4, mte_k=3, mte_source="commit", policy_tokens="unknown")
    assert torch.equal(plain.tokens, commit_all.tokens)
    for rec in commit_all.steps.values():
        flat = rec.diffused.reshape(-1).nonzero().flatten()[rec.mte_tokens]
        for col, pos in enumerate(flat.tolist()):
            if pos in chains:
                assert torch.equal(chains[pos], rec.mte_x[:, :, col])
                repeats += 1
            chains[pos] = rec.mte_x[:, :, col]
    assert repeats > 0 and len(chains) <= 4 * int(64 * 0.3)


@pytest.mark.parametrize("head", ["ddpm", "flow"])
@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
@pytest.mark.parametrize("policy_tokens", ["committed", "unknown"])
def test_recomputed_log_probs_equal_recorded(head, guidance_scale, policy_tokens):
    """The invariant: z and log-probs recomputed from the Rollout reproduce the rollout (ratio == 1)."""
    m = make(head)
    r = run(m, ar_steps=5, guidance_scale=guidance_scale, policy_tokens=policy_tokens)
    m.train()  # the trainer keeps the model in train mode; replay must still match (dropout off)
    js = [j for j in range(r.head_steps) if m.head.is_stochastic(j)]
    for i, rec in r.steps.items():
        with torch.no_grad():
            sc = step_z(m, r, i)
            st = replay_transitions(m.head, rec.x, js, sc, r.temperature)
        assert (sc.z_full - rec.z).abs().max() / rec.z.abs().max() < 1e-5
        ref = rec.logp[js]
        assert (st.logp - ref).abs().max() / ref.abs().max() < 1e-5
        assert torch.isfinite(st.logp).all()
    # with grad: same values, and the gradient reaches the transformer through z only
    i = 2
    sc = step_z(m, r, i)
    st = replay_transitions(m.head, r.steps[i].x, js, sc, r.temperature)
    ratio = torch.exp(st.logp - r.steps[i].logp[js])
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    st.logp.sum().backward()
    assert m.z_proj.weight.grad is not None and m.z_proj.weight.grad.abs().sum() > 0


def test_cond_only_scoring_differs_under_guidance():
    m = make(std=0.15)  # large enough weights that the class condition visibly moves z
    r = run(m, ar_steps=4, guidance_scale=3.0, guidance_schedule="constant")
    js = [3, 4]  # late steps: early ones are dominated by the x0 clamp
    with torch.no_grad():
        guided = replay_transitions(m.head, r.steps[0].x, js, step_z(m, r, 0, "rollout"), 1.0)
        cond_only = replay_transitions(m.head, r.steps[0].x, js, step_z(m, r, 0, "cond_only"), 1.0)
    assert (guided.mean - cond_only.mean).abs().max() > 1e-4
    ref = r.steps[0].logp[js]
    assert (guided.logp - ref).abs().max() / ref.abs().max() < 1e-5


def test_unrecorded_step_is_a_clear_error():
    m = make()
    r = run(m, ar_steps=4, steps=(0,))
    with pytest.raises(KeyError, match="not recorded"):
        step_z(m, r, 2)


def test_images_do_not_depend_on_what_is_diffused_or_recorded():
    """Committed tokens draw their noise from the main stream; extra diffused tokens from their own."""
    m = make()
    plain = run(m, ar_steps=6, record=False)
    for kw in (dict(policy_tokens="unknown"), dict(policy_tokens="unknown", steps=(2, 3)),
               dict(policy_tokens="committed", steps=(1,))):
        assert torch.equal(run(m, ar_steps=6, **kw).tokens, plain.tokens), kw
    sub = run(m, ar_steps=6, policy_tokens="unknown", steps=(2, 3))
    assert torch.equal(sub.steps[2].diffused, ~sub.steps[2].known)


def test_bare_label_tensor_with_guidance():
    m = make()
    r = sample(m, torch.tensor([1, 2]), 2, SamplerConfig(ar_steps=3, diffusion_steps=None, guidance_scale=2.0),
               torch.Generator().manual_seed(0))
    assert r.tokens.shape == (2, 64, 48)


def test_the_ar_schedule_comes_from_the_policy_and_is_checked():
    """The sampler takes the policy's schedule (a family may give fewer steps than asked, as NOVA drops the empty
    ones) and refuses one that does not cover every token once."""

    class TwoSteps(MARPolicy):
        def mask_schedule(self, num_steps, seq_len=None):
            return [40, 24]

    class Broken(MARPolicy):
        def mask_schedule(self, num_steps, seq_len=None):
            return [40, 20]  # 4 tokens never generated

    kw = tiny_mar_kwargs(num_sampling_steps="6")
    m = randomize(TwoSteps(**kw), seed=1)
    r = run(m, ar_steps=4)
    assert r.counts == [40, 24] and r.num_ar_steps == 2 and sorted(r.steps) == [0, 1]
    assert bool((r.steps[1].known | r.steps[1].to_pred).all())
    with pytest.raises(ValueError, match="sum to 64"):
        run(randomize(Broken(**kw), seed=1), ar_steps=4)


def test_set_sampling_steps_resets_the_scheduler_not_the_network():
    for head in ("ddpm", "flow"):
        m = make(head)
        net = {k: v.clone() for k, v in m.head.net.state_dict().items()}
        module = m.head.net
        m.head.set_sampling_steps(4)
        assert m.head.num_steps == 4 and m.head.net is module
        assert all(torch.equal(v, m.head.net.state_dict()[k]) for k, v in net.items())
