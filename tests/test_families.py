"""Every model family against the `Policy` / `ImageModel` contract and the invariants RL rests on.

Parametrised over `families.FAMILIES`, so a new family gets all of them by adding one entry there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES

from margrpo.models.loading import load_model
from margrpo.rl.advantages import group_advantages
from margrpo.rl.config import AlgorithmSection
from margrpo.rl.loss import ar_step_loss, replay_transitions, step_z
from margrpo.sampling.sampler import guided_z, sample

from conftest import sampling

FAMILY_NAMES = list(FAMILIES)


def _rollout(model, guidance_scale=1.0, **cfg):
    fam_prompts = cfg.pop("prompts")
    cond = model.encode_prompts(list(fam_prompts)).repeat_interleave(3)
    scfg, plan = sampling(ar_steps=4, guidance_scale=guidance_scale, **cfg)
    return sample(model.policy, cond, 6, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
                  record=plan)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_policy_keeps_the_contract(family, tmp_path):
    """z depends on known tokens only, `drop` and `cond=None` give the unconditional prompt, calls keep no state,
    the AR schedule covers every token, decode leaves its argument alone, and a saved folder loads back exactly."""
    fam = FAMILIES[family]
    model = fam.build()
    policy = model.policy
    g = torch.Generator().manual_seed(3)
    cond = model.encode_prompts(list(fam.prompts))
    tokens = torch.randn(2, model.seq_len, model.token_embed_dim, generator=g)
    order = torch.rand(2, model.seq_len, generator=g).argsort(1)
    mask = torch.zeros(2, model.seq_len)
    mask.scatter_(1, order[:, : model.seq_len // 2], 1.0)
    with torch.no_grad():
        z = policy(tokens, mask, cond)
        assert torch.equal(z, policy(tokens, mask, cond))  # stateless: the same call gives the same z
        assert torch.equal(z, model.compute_z(tokens, mask, cond)) and torch.equal(z, policy.compute_z(tokens, mask,
                                                                                                      cond))
        other = torch.where(mask.bool()[..., None], torch.randn(tokens.shape, generator=g), tokens)
        assert torch.allclose(z, policy(other, mask, cond), atol=1e-6)  # unknown positions' values are unseen
        zu = policy(tokens, mask, None)
        zd = policy(tokens, mask, cond, drop=torch.tensor([True, False]))
        assert torch.allclose(zd[0], zu[0], atol=1e-6) and torch.allclose(zd[1], z[1], atol=1e-6)
        assert float((z[0] - zu[0]).abs().max()) > 1e-5  # the prompt matters (beyond float rounding)
    for steps in (1, 4, 8):
        counts = model.mask_schedule(steps)
        assert len(counts) == steps and sum(counts) == model.seq_len and min(counts) >= 1
    groups = policy.parameter_groups()
    assert set(groups) >= {"ar", "head"} and groups["ar"] and groups["head"]
    # the groups partition the policy's parameters, and "head" is exactly what sits under the head's module path
    head_path = next(name for name, m in policy.named_modules() if m is policy.head)
    names = {g: {n for n, _ in ps} for g, ps in groups.items()}
    assert names["head"] == {n for n, _ in policy.named_parameters() if n.startswith(head_path + ".")}
    assert set().union(*names.values()) == {n for n, _ in policy.named_parameters()}
    assert sum(len(v) for v in names.values()) == len(list(policy.named_parameters()))  # disjoint
    trainable = model.trainable_parameters("ar")
    assert {id(p) for _, p in trainable} == {id(p) for _, p in groups["ar"]}
    assert all(p.requires_grad == (id(p) in {id(q) for _, q in trainable}) for p in model.parameters())
    before = tokens.clone()
    with torch.no_grad():
        images = model.decode(tokens)
        assert torch.equal(tokens, before) and images.shape == (2, 3, model.image_size, model.image_size)
        assert float(images.abs().max()) <= 1.0
        again_tokens = model.encode_images(images, generator=torch.Generator().manual_seed(0))
        assert again_tokens.shape == tokens.shape and torch.isfinite(again_tokens).all()
    model.save_pretrained(tmp_path / "m")
    rng = torch.get_rng_state()
    again = load_model(str(tmp_path / "m"), "cpu")  # the folder is recognised by its layout
    assert torch.equal(rng, torch.get_rng_state())  # building the modules did not draw from the global RNG
    assert type(again) is type(model)
    assert not again.training  # loaders return eval mode
    assert {k: v for k, v in again.state_dict().items()}.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    with torch.no_grad():
        assert torch.equal(again.policy(tokens, mask, again.encode_prompts(list(fam.prompts))), z)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("guidance_scale,score_guidance,mte_source,policy_tokens", [
    (1.0, "rollout", "commit", "unknown"),
    (2.0, "rollout", "scored", "unknown"),
    (2.0, "cond_only", "commit", "committed"),
    (1.0, "rollout", "scored", "committed"),
    (2.0, "rollout", "bridge", "unknown"),
])
def test_ratio_is_one_before_the_first_update(family, guidance_scale, score_guidance, mte_source, policy_tokens):
    """The old log-probabilities are the rollout's own (main trajectory and MTE chains, recorded at sampling), so a
    replay that differed from sampling in any way would show here as a ratio away from 1."""
    fam = FAMILIES[family]
    model = fam.build()
    r = _rollout(model, guidance_scale, prompts=fam.prompts, policy_tokens=policy_tokens, mte_k=3,
                 mte_source=mte_source, score_guidance=score_guidance)
    adv = group_advantages(torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))
    ocfg = AlgorithmSection(score_guidance=score_guidance, beta=0.1, mte_k=3, mte_top_fraction=0.3,
                            policy_tokens="consistent" if policy_tokens == "unknown" else policy_tokens)
    policy = model.policy
    policy.train()  # the trainer may keep the policy in train mode; replay must still match (dropout off)
    ref = copy.deepcopy(policy).eval()
    js = [j for j in range(policy.head.num_steps) if policy.head.is_stochastic(j)][:3]
    cache: dict = {}
    for i in range(4):
        sl = ar_step_loss(policy, ref, r, i, js, adv.values, adv.use, ocfg, cache, first_epoch=True)
        assert abs(sl.stats["ratio/max"] - 1) < 1e-5 and abs(sl.stats["ratio/min"] - 1) < 1e-5
        assert abs(sl.stats["mte/ratio_max"] - 1) < 1e-5 and abs(sl.stats["mte/ratio_min"] - 1) < 1e-5
        assert sl.stats["loss/kl"] == pytest.approx(0.0, abs=1e-10)  # policy == reference before any update
        sl.loss.backward()
    ar_grads = [p.grad for _, p in policy.parameter_groups()["ar"] if p.grad is not None]
    assert ar_grads and sum(float(g.abs().sum()) for g in ar_grads) > 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_replay_recomputes_the_rollouts_conditions_and_log_probs(family, guidance_scale):
    fam = FAMILIES[family]
    model = fam.build()
    r = _rollout(model, guidance_scale, prompts=fam.prompts, policy_tokens="unknown")
    head = model.policy.head
    js = [j for j in range(r.head_steps) if head.is_stochastic(j)]
    for i, rec in r.steps.items():
        with torch.no_grad():
            sc = step_z(model.policy, r, i)
            st = replay_transitions(head, rec.x, js, sc, r.temperature)
        assert (sc.z_full - rec.z).abs().max() / rec.z.abs().max() < 1e-5
        ref = rec.logp[js]
        assert (st.logp - ref).abs().max() / ref.abs().max() < 1e-5 and torch.isfinite(st.logp).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_batched_steps_give_each_steps_own_conditions(family):
    """Several AR steps in one transformer call (ragged known sets, padded: the family contract's `mask` rows may
    hold different numbers of known tokens) equal one call per step, both guidance branches."""
    fam = FAMILIES[family]
    model = fam.build()
    r = _rollout(model, 2.0, prompts=fam.prompts)
    steps = [r.steps[i] for i in (0, 1, 3)]
    cond = type(r.cond).cat([r.cond] * len(steps))
    with torch.no_grad():
        z_c, z_u = guided_z(model.policy, torch.cat([s.canvas for s in steps]),
                                      torch.cat([s.mask for s in steps]), cond, True)
        b = r.batch_size
        for k, i in enumerate((0, 1, 3)):
            single = step_z(model.policy, r, i)
            rows = slice(k * b, (k + 1) * b)
            assert torch.allclose(z_c[rows][steps[k].diffused], single.z, atol=1e-5, rtol=1e-4)
            assert torch.allclose(z_u[rows][steps[k].diffused], single.z_uncond, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_the_head_broadcasts_a_chain_axis_over_the_token_conditions(family, guided):
    """head(x [K, N, C], j, z [N, D]) is K calls head(x[k], j, z): MTE's chains share each token's conditioning,
    and the one-call form must be the same transition (mean and std), gradients into z included."""
    fam = FAMILIES[family]
    model = fam.build()
    head = model.policy.head
    g = torch.Generator().manual_seed(5)
    n, k = 7, 3
    with torch.no_grad():  # the width of the policy's z
        d = model.policy(torch.zeros(1, model.seq_len, model.token_embed_dim), torch.ones(1, model.seq_len),
                         model.encode_prompts(list(fam.prompts[:1]))).shape[-1]
    z = torch.randn(n, d, generator=g).requires_grad_(True)
    zu = torch.randn(z.shape, generator=g) if guided else None
    x = torch.randn(k, n, head.token_dim, generator=g)
    j = next(j for j in range(head.num_steps) if head.is_stochastic(j))
    together = head(x, j, z, zu, 2.0 if guided else 1.0)
    apart = [head(x[c], j, z, zu, 2.0 if guided else 1.0) for c in range(k)]
    assert together.mean.shape == x.shape
    torch.testing.assert_close(together.mean, torch.stack([a.mean for a in apart]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together.std, torch.stack([a.std for a in apart]), atol=1e-6, rtol=1e-5)
    w = torch.randn(x.shape, generator=g)
    (g_together,) = torch.autograd.grad((together.mean * w).sum(), z)
    (g_apart,) = torch.autograd.grad(sum((a.mean * w[c]).sum() for c, a in enumerate(apart)), z)
    torch.testing.assert_close(g_together, g_apart, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("tokenizer"), "missing key(s) ['tokenizer']"),
    (lambda s: s["mar"].pop("head"), "lacks ['head']"),
    (lambda s: s["mar"].update(heads=3), "has unknown fields ['heads']"),
    (lambda s: s.update(version="1"), "'version' must be an integer"),
    (lambda s: s["text_encoder"].pop("dim"), "lacks ['dim']"),
    (lambda s: s.update(tokenizer=None), "key 'tokenizer' must be an object"),
])
def test_a_model_folder_states_everything_it_is_read_as(tmp_path, edit, message):
    """The loader never fills in what config.json does not say: each gap is one error naming the file and key."""
    import json

    from margrpo.models.loading import load_model

    FAMILIES["mar-text-ddpm"].build().save_pretrained(tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "config.json").read_text())
    edit(spec)
    (tmp_path / "m" / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path / "m"), "cpu")
    assert message in str(err.value) and str(tmp_path / "m" / "config.json") in str(err.value)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("estimator", ["trajectory", "matching", "nft"])
def test_rollouts_and_losses_go_through_the_module_calls(family, estimator):
    """DDP all-reduces, and FSDP2 unshards, only around a module's call: every z comes from calling the policy (in
    sampling and in every estimator's replay), every transition from calling the head (sampling, and the
    trajectory estimator's replay). The forward-process estimators evaluate the head's training loss on z, which a
    frozen head (the default) needs no hook for."""
    fam = FAMILIES[family]
    model = fam.build()
    policy = model.policy
    calls = {"policy": 0, "head": 0}

    def count(name):
        def hook(module, args):
            calls[name] += 1
        return hook

    handles = [policy.register_forward_pre_hook(count("policy")), policy.head.register_forward_pre_hook(count("head"))]
    r = _rollout(model, 2.0, prompts=fam.prompts)
    assert calls["policy"] == r.num_ar_steps and calls["head"] > 0
    calls.update(policy=0, head=0)
    adv = group_advantages(torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))
    js = [j for j in range(policy.head.num_steps) if policy.head.is_stochastic(j)][:2]
    ocfg = AlgorithmSection(estimator=estimator, beta=0.0, policy_tokens="unknown", mte_k=0)
    sl = ar_step_loss(policy, None, r, 1, js, adv.values, adv.use, ocfg, {}, first_epoch=True,
                      generator=torch.Generator().manual_seed(0))
    sl.loss.backward()
    assert calls["policy"] == 1
    if estimator == "trajectory":
        assert calls["head"] == len(js)
    for h in handles:
        h.remove()


def test_a_folder_that_is_no_model_is_one_error_naming_what_is_valid(tmp_path):
    from margrpo.models.loading import load_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_model(str(tmp_path / "empty"), "cpu")
    msg = str(err.value)
    assert str(tmp_path / "empty") in msg and all(w in msg for w in ("margrpo or Harmon", "NOVA", "checkpoints/"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_guidance_follows_the_familys_schedule_unless_the_config_names_one(family):
    """MAR ramps the guidance scale over AR steps (LTH14); NOVA and Harmon keep it constant (upstream)."""
    fam = FAMILIES[family]
    model = fam.build()
    expected = "linear" if family.startswith("mar") else "constant"
    assert model.policy.default_guidance_schedule == expected
    r = _rollout(model, 3.0, prompts=fam.prompts)
    scales = [rec.guidance for _, rec in sorted(r.steps.items())]
    assert r.guidance_schedule == expected
    if expected == "constant":
        assert scales == [3.0] * len(scales)
    else:
        assert scales == sorted(scales) and 1.0 < scales[0] < scales[-1] < 3.0  # (LTH14 stops 1 token short)
    forced = _rollout(model, 3.0, prompts=fam.prompts, guidance_schedule="constant")
    assert [rec.guidance for rec in forced.steps.values()] == [3.0] * len(forced.steps)
