"""The RL objective and trainer: ratio is 1 before the first update, frozen head, end-to-end run and resume."""

import dataclasses

import pytest
import torch

from margrpo.rl.advantages import group_advantages
from margrpo.rl.config import AlgorithmSection, TrainConfig
from margrpo.rl.loss import PolicyNorm, ar_step_loss, kept_policy_tokens
from margrpo.rl.selection import scorable_head_steps, select_steps
from margrpo.rl.trainer import Trainer
from margrpo.sampling.sampler import sample
from margrpo.utils.config import load_config
from margrpo.utils.metrics import read_metrics

from conftest import sampling, tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(path)
    return path


def test_rollout_normalisation_weighs_every_kept_pair_alike():
    model = tiny_model()
    cond = model.encode_prompts(["a red circle", "two blue squares"]).repeat_interleave(3)
    scfg, plan = sampling(ar_steps=4, policy_tokens="unknown", mte_k=3, mte_source="scored", record_z=False)
    r = sample(model.mar, cond, 6, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
               record=plan)
    adv = group_advantages(torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))
    # per AR step: loss = sum over kept pairs / (kept tokens x head steps); rollout: the same sum / D
    element = ar_step_loss(model.mar, None, r, 2, [0, 2, 4], adv.values, adv.use,
                           AlgorithmSection(beta=0.0, mte_k=3), {}, True)
    assert abs(element.stats["ratio/max"] - 1) < 1e-5 and abs(element.stats["ratio/min"] - 1) < 1e-5
    assert abs(element.stats["mte/ratio_max"] - 1) < 1e-5
    by_rollout = AlgorithmSection(beta=0.0, mte_k=3, normalize="rollout")
    norm = PolicyNorm.of(r, [1, 2], {1: [0, 2], 2: [0, 2, 4]}, adv.use, by_rollout)
    # the denominator: the kept (token, head step) pairs of the rollout's scored steps, over the scored steps
    pairs = [float(kept_policy_tokens(r, i, adv.use, by_rollout).sum()) * n for i, n in ((1, 2), (2, 3))]
    assert norm.denominator == pytest.approx(sum(pairs) / 2) and norm.weights == {1: 1.0, 2: 1.0}
    rollout = ar_step_loss(model.mar, None, r, 2, [0, 2, 4], adv.values, adv.use, by_rollout, {}, True,
                           norm=dataclasses.replace(norm, denominator=123.0))
    c = r.tokens.shape[-1]
    assert rollout.stats["loss/policy"] * 123.0 == pytest.approx(element.stats["loss/policy"]
                                                                 * element.stats["elements"] / c, rel=1e-5)
    with pytest.raises(ValueError, match="PolicyNorm"):  # the rollout's denominator cannot come from one step
        ar_step_loss(model.mar, None, r, 2, [0], adv.values, adv.use, AlgorithmSection(normalize="rollout"), {}, True)


def test_policy_norm_weighs_a_rank_by_its_share_of_the_global_kept_tokens():
    """Rank r's policy term, a mean over its k_r kept tokens, is weighed W k_r / K (K the global count), so that the
    ranks' averaged gradient is the gradient of one mean over the global batch."""
    model = tiny_model()
    cond = model.encode_prompts(["a red circle", "two blue squares"]).repeat_interleave(3)
    scfg, plan = sampling(ar_steps=4, policy_tokens="unknown", record_z=False)
    r = sample(model.mar, cond, 6, scfg, torch.Generator().manual_seed(0), record=plan)
    adv = group_advantages(torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))
    other = [7.0, 3.0]  # the other rank's kept tokens at AR steps 1 and 2
    norm = PolicyNorm.of(r, [1, 2], {1: [0], 2: [0]}, adv.use, AlgorithmSection(mte_k=0), world=2,
                         all_reduce_sum=lambda values: [v + o for v, o in zip(values, other, strict=True)])
    for i, o in zip((1, 2), other, strict=True):
        k = float(norm.keep[i].sum())
        assert k > 0 and norm.weights[i] == pytest.approx(2 * k / (k + o))
    assert norm.denominator is None


@pytest.mark.parametrize("mte_source", ["commit", "scored", "bridge"])
def test_the_recorded_old_log_probs_catch_a_replay_that_differs_from_sampling(mte_source):
    """The ratio-is-1 check is not true by construction: a model changed after sampling moves every ratio."""
    model = tiny_model()
    cond = model.encode_prompts(["a red circle", "two blue squares"]).repeat_interleave(3)
    scfg, plan = sampling(ar_steps=4, guidance_scale=2.0, policy_tokens="unknown", mte_k=3, mte_source=mte_source,
                          record_z=False, score_guidance="cond_only")
    r = sample(model.mar, cond, 6, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
               record=plan)
    adv = group_advantages(torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))
    ocfg = AlgorithmSection(score_guidance="cond_only", beta=0.0, policy_tokens="unknown", mte_k=3,
                            mte_top_fraction=0.3)
    with torch.no_grad():
        model.mar.z_proj.weight.add_(0.05 * torch.randn(model.mar.z_proj.weight.shape,
                                                      generator=torch.Generator().manual_seed(2)))
    sl = ar_step_loss(model.mar, None, r, 2, [0, 2, 4], adv.values, adv.use, ocfg, {}, first_epoch=True)
    assert max(sl.stats["ratio/max"] - 1, 1 - sl.stats["ratio/min"]) > 1e-3
    assert max(sl.stats["mte/ratio_max"] - 1, 1 - sl.stats["mte/ratio_min"]) > 1e-3


def test_matching_estimator_is_the_advantage_weighted_pretraining_loss_at_ratio_one():
    """AWM: before an update rho = 1 exactly, and the gradient equals that of mean(A x head pretraining loss)."""
    model = tiny_model().eval()
    cond = model.encode_prompts(["a red circle", "two blue squares"]).repeat_interleave(3)
    scfg, plan = sampling(ar_steps=4, record_z=False)
    r = sample(model.mar, cond, 6, scfg, torch.Generator().manual_seed(0), record=plan)
    adv = group_advantages(torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))
    ocfg = AlgorithmSection(estimator="matching", mte_k=0, noise_draws=3, beta=0.0, policy_tokens="unknown")
    step = 2
    cache: dict = {}
    sl = ar_step_loss(model.mar, None, r, step, [0], adv.values, adv.use, ocfg, cache, True,
                      generator=torch.Generator().manual_seed(5))
    assert sl.stats["ratio/max"] == 1.0 and sl.stats["ratio/min"] == 1.0
    sl.loss.backward()
    got = model.mar.z_proj.weight.grad.clone()
    # a second PPO epoch with the same draws and no update: still exactly 1
    again = ar_step_loss(model.mar, None, r, step, [0], adv.values, adv.use, ocfg, cache, False,
                         generator=torch.Generator().manual_seed(5))
    assert again.stats["ratio/max"] == 1.0 and again.stats["ratio/min"] == 1.0
    with pytest.raises(RuntimeError, match="no old loss"):
        ar_step_loss(model.mar, None, r, step, [0], adv.values, adv.use, ocfg, {}, False,
                     generator=torch.Generator().manual_seed(5))

    # explicit: z of the step's committed tokens, the head's loss on their final values, weighted by A
    model.mar.zero_grad()
    rec = r.steps[step]
    z = model.mar.compute_z(rec.canvas, rec.mask, r.cond)[rec.diffused]
    target = r.tokens[rec.diffused]
    img = torch.arange(6).repeat_interleave(int(rec.diffused.sum()) // 6)
    g = torch.Generator().manual_seed(5)
    # stratified noise levels: draw k of every token has its training timestep in the k-th third of [0, T)
    n_steps = model.mar.head.train_schedule.num_steps
    t = ((torch.arange(3)[:, None] + torch.rand((3, len(target)), generator=g)) / 3 * n_steps).floor().long()
    loss = model.mar.head.loss(target.repeat(3, 1), z.repeat(3, 1), generator=g, t=t.reshape(-1))
    (adv.values[img].repeat(3) * loss).mean().backward()
    assert torch.allclose(got, model.mar.z_proj.weight.grad, atol=1e-6, rtol=1e-4)
    assert got.abs().sum() > 0
    with pytest.raises(ValueError, match="valid: 'trajectory', 'matching'"):  # no silent fallback
        ar_step_loss(model.mar, None, r, step, [0], adv.values, adv.use, AlgorithmSection(estimator="awm", mte_k=0),
                     {}, True)
    # trajectory-only options are refused with the matching estimator, naming the conflicting key
    with pytest.raises(ValueError, match="mte_k"):
        load_config(TrainConfig, None, ["algorithm.estimator=matching", "algorithm.mte_k=4"])


def test_frozen_head_gets_no_gradient_and_does_not_change(tiny_model_dir, tmp_path):
    cfg = load_config(TrainConfig, None, [
        f"model={tiny_model_dir}", f"out_dir={tmp_path / 'run'}", "steps=2", "rewards={colour_fraction: 1.0}",
        "algorithm.prompts_per_step=2", "algorithm.group_size=4", "sampling.ar_steps=4", "sampling.diffusion_steps=6",
        "algorithm.head_steps_per_ar_step=2", "optim.lr=1e-2", "log.tensorboard=false"])
    tr = Trainer(cfg, progress=False)
    head_before = {k: v.clone() for k, v in tr.model.mar.diffloss.state_dict().items()}
    body_before = tr.model.mar.z_proj.weight.clone()
    tr.run()
    assert all(torch.equal(head_before[k], v) for k, v in tr.model.mar.diffloss.state_dict().items())
    assert all(p.grad is None for p in tr.model.mar.diffloss.parameters())
    assert not torch.equal(body_before, tr.model.mar.z_proj.weight)
    names = [n for n, _ in tr.model.trainable_parameters("head")]
    assert names and all(n.startswith("mar.diffloss.") for n in names)


def _cfg(model_dir, out, steps, extra=()):
    return load_config(TrainConfig, None, [
        f"model={model_dir}", f"out_dir={out}", f"steps={steps}", "rewards={colour_fraction: 1.0}",
        "algorithm.prompts_per_step=2", "algorithm.group_size=4", "sampling.ar_steps=4", "sampling.diffusion_steps=6",
        "algorithm.head_steps_per_ar_step=2", "algorithm.ppo_epochs=2", "log.checkpoint_every=2",
        "log.sample_every=100", "log.tensorboard=false", "optim.lr=3e-3", *extra])


@pytest.mark.parametrize("extra", [(), ("algorithm.normalize=rollout",),
                                   ("algorithm.estimator=matching", "algorithm.mte_k=0"),
                                   ("algorithm.estimator=nft", "algorithm.mte_k=0"),
                                   ("eval.every=2", "eval.per_category=2", "eval.in_distribution=true",
                                    "eval.ema_decay=0.5")],
                         ids=["trajectory", "rollout-norm", "matching", "nft", "eval+ema"])
def test_end_to_end_run_and_resume_equals_uninterrupted(tiny_model_dir, tmp_path, extra):
    full = Trainer(_cfg(tiny_model_dir, tmp_path / "full", 4, extra), progress=False)
    m_full = full.run()
    assert len(m_full) == 4 and all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in m_full)
    assert (tmp_path / "full" / "report.png").is_file() and (tmp_path / "full" / "model" / "config.json").is_file()
    assert (tmp_path / "full" / "samples" / "step-0.png").is_file()
    # "crash" after step 2: run a 2-step job, then resume it to 4 steps
    Trainer(_cfg(tiny_model_dir, tmp_path / "crash", 2, extra), progress=False).run()
    resumed = Trainer(_cfg(tiny_model_dir, tmp_path / "crash", 4, extra), progress=False)
    m_res = resumed.run(resume=True)
    for a, b in zip(full.model.mar.parameters(), resumed.model.mar.parameters(), strict=True):
        assert torch.equal(a, b)
    drop = ("time/", "memory/")
    clean = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / "crash")]
    assert clean == [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / "full")]
    assert len(m_res) == 4
    if "eval.every=2" in extra:  # evaluated at steps 0, 2, 4, paired with step 0, the EMA beside the policy
        rows = {r["step"]: r for r in read_metrics(tmp_path / "full")}
        assert {"eval/heldout/strict", "eval/train/strict"} <= set(rows[0])
        want = {"eval/heldout/strict_change_se", "eval_ema/heldout/strict", "eval_ema/train/strict_change"}
        assert want <= set(rows[4])
        assert "eval/heldout/strict" not in rows[3]
        assert (tmp_path / "full" / "eval" / "step-4_ema.json").is_file()
        assert (tmp_path / "full" / "model_ema" / "config.json").is_file()


def test_step_selection_is_reproducible_and_records_predecessors(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path / "x", 1, ["sampling.ar_steps=8", "algorithm.ar_step_fraction=0.375"])
    model = tiny_model()
    a = select_steps(cfg, model.mar, 5)
    assert a == select_steps(cfg, model.mar, 5)
    ar, head_steps, plan = a
    record = plan.steps
    assert plan.head_steps == {i: tuple(v) for i, v in head_steps.items()}  # MTE log-probs where the loss scores
    assert len(ar) == 3 and all(i in record for i in ar)
    assert all(i - 1 in record for i in ar if i > cfg.algorithm.consistency_start)
    assert all(len(v) == 2 and all(model.mar.head.is_stochastic(j) for j in v) for v in head_steps.values())


def test_gradient_checkpointing_backward_matches(tmp_path):
    """With checkpointing the re-forward during backward must see the sampling function (no dropout)."""
    grads = []
    for ckpt in (False, True):
        model = tiny_model()
        model.mar.config.grad_checkpointing = ckpt
        model.mar.config.attn_dropout = model.mar.config.proj_dropout = 0.1
        model.eval()
        cond = model.encode_prompts(["a red circle"]).repeat_interleave(4)
        scfg, plan = sampling(ar_steps=3, record_z=False)
        r = sample(model.mar, cond, 4, scfg, torch.Generator().manual_seed(0), record=plan)
        adv = group_advantages(torch.tensor([0.0, 1.0, 0.5, 0.2]), torch.zeros(4, dtype=torch.long))
        sl = ar_step_loss(model.mar, None, r, 1, [0, 1], adv.values, adv.use, AlgorithmSection(beta=0.0), {}, True)
        sl.loss.backward()
        grads.append(model.mar.z_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fresh_run_refuses_a_directory_with_checkpoints(tiny_model_dir, tmp_path):
    Trainer(_cfg(tiny_model_dir, tmp_path / "r", 2), progress=False).run()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_cfg(tiny_model_dir, tmp_path / "r", 2), progress=False).run()


def test_prompt_sampling_balances_categories_unless_told_not_to():
    from collections import Counter

    from margrpo.rl.prompts import PromptSource
    from margrpo.worlds import shapes

    def shares(balance: str) -> dict[str, float]:
        cfg = load_config(TrainConfig, None, [f"prompts.category_balance={balance}"])
        src = PromptSource(cfg)
        cats = Counter(shapes.parse_prompt(p).category for k in range(50) for p in src.batch(k, 16)[0])
        assert set(src.batch(3, 16)[0]) <= set(shapes.train_prompts())
        assert src.batch(3, 16) == PromptSource(cfg).batch(3, 16)  # a pure function of (seed, step)
        return {c: n / 800 for c, n in cats.items()}

    stratified, balanced, uniform = shares("stratified"), shares("random"), shares("off")
    assert all(stratified[c] == 0.25 for c in shapes.CATEGORIES), stratified  # 16 = 4 rounds of 4 categories
    assert all(0.2 < balanced[c] < 0.3 for c in shapes.CATEGORIES), balanced
    assert uniform["position"] > 0.7 and uniform.get("single", 0) < 0.05, uniform  # 940 of 1171 prompts


@pytest.mark.parametrize("n, per_category", [(4, {1}), (8, {2}), (6, {1, 2}), (2, {0, 1}), (1, {0, 1})])
def test_stratified_batches_hold_every_category_when_prompts_per_step_allows(n, per_category):
    """4 categories: 4 prompts hold one of each, 8 two of each; 6 hold one of each plus two of two distinct
    categories; 2 hold two distinct categories. The leftover categories are drawn at random: over steps each
    category gets its share."""
    from collections import Counter

    from margrpo.rl.prompts import PromptSource
    from margrpo.worlds import shapes

    src = PromptSource(load_config(TrainConfig, None, []))
    leftover = Counter()
    for step in range(200):
        counts = Counter(shapes.parse_prompt(p).category for p in src.batch(step, n)[0])
        full = [counts.get(c, 0) for c in shapes.CATEGORIES]
        assert set(full) <= per_category and sum(full) == n, (step, counts)
        assert sum(full) - min(full) * 4 == n % 4  # the rest from distinct categories: at most one extra each
        leftover.update(c for c in shapes.CATEGORIES if counts.get(c, 0) > n // 4)
    if n % 4:
        share = [leftover[c] / (200 * (n % 4)) for c in shapes.CATEGORIES]
        assert all(0.17 < x < 0.33 for x in share), share


def test_stratified_shards_cut_one_global_batch():
    """Under torchrun each shard takes its part of the step's global batch: 2 shards of 4 prompts are the 8-prompt
    batch, so the whole step is stratified (and each shard too, the batch being round-major)."""
    from collections import Counter

    from margrpo.rl.prompts import PromptSource
    from margrpo.worlds import shapes

    src = PromptSource(load_config(TrainConfig, None, []))
    for step in range(5):
        whole = src.batch(step, 8)
        parts = [src.batch(step, 4, shard, 2) for shard in range(2)]
        assert parts[0][0] + parts[1][0] == whole[0] and parts[0][1] + parts[1][1] == whole[1]
        for prompts, _ in parts:
            assert sorted(Counter(shapes.parse_prompt(p).category for p in prompts).values()) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="shard 2 of 2"):
        src.batch(0, 4, 2, 2)


def test_the_old_balance_option_names_its_replacement():
    from margrpo.utils.config import ConfigError

    with pytest.raises(ConfigError, match="renamed to 'prompts.category_balance'"):
        load_config(TrainConfig, None, ["prompts.balance_categories=true"])
    with pytest.raises(ConfigError, match="'stratified', 'random', 'off'"):
        load_config(TrainConfig, None, ["prompts.category_balance=true"])


def test_ptx_term_trains_on_rendered_batches_even_without_reward_signal(tiny_model_dir, tmp_path):
    # a reward of 1 for every image (every pixel is within 500 of grey): every group ties, so the policy
    # term is exactly zero; beta=0 because the KL's gradient at policy == reference is round-off, which
    # Adam would scale up to lr-sized steps
    never = ["reward_options={colour_fraction: {colour: [128, 128, 128], tolerance: 500}}", "algorithm.beta=0"]
    plain = Trainer(_cfg(tiny_model_dir, tmp_path / "plain", 3, never), progress=False)
    before = {n: p.clone() for n, p in plain.params}
    rows = plain.run()
    assert all(r["zero_signal_fraction"] == 1.0 for r in rows)
    assert all(torch.equal(before[n], p) for n, p in plain.params)  # no signal, no ptx: nothing moves

    ptx = Trainer(_cfg(tiny_model_dir, tmp_path / "ptx", 8, [*never, "algorithm.ptx_weight=1.0",
                                                              "algorithm.ptx_batch_size=8"]), progress=False)
    with torch.no_grad():
        held = ptx.ptx_loss(999).item()  # a batch the run never trains on, same masks and noise both times
        assert ptx.ptx_loss(999).item() == held
    rows = ptx.run()
    assert all(torch.isfinite(torch.tensor(r["loss/ptx"])) for r in rows)
    with torch.no_grad():
        assert ptx.ptx_loss(999).item() < held
    head = [p for n, p in ptx.model.mar.named_parameters() if n.startswith("diffloss.")]
    assert all(p.grad is None for p in head)  # the frozen head stays frozen under the ptx term too

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle\n")
    with pytest.raises(ValueError, match="only the shapes world"):
        Trainer(_cfg(tiny_model_dir, tmp_path / "bad", 1, ["algorithm.ptx_weight=1.0",
                                                            f"prompts.source={prompt_file}"]))


def test_parameter_ema_follows_the_recursion_and_swaps_back_exactly():
    from margrpo.rl.eval_loop import ParameterEMA

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = ParameterEMA([("w", w)], decay=0.75)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 2.0]))
    ema.update()  # 0.75 x (1, -2) + 0.25 x (3, 2)
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, 0.0]))
    ema.update()  # 0.75 x (1.5, -1) + 0.25 x (5, 0)
    assert torch.allclose(ema.shadow["w"], torch.tensor([2.375, -0.75]))
    with ema.swapped():
        assert torch.equal(w.detach(), ema.shadow["w"])
    assert torch.equal(w.detach(), torch.tensor([5.0, 0.0]))


def test_diagnose_reports_every_stochastic_head_step_with_shares_that_sum_to_one(tiny_model_dir, tmp_path):
    from margrpo.rl.diagnose import head_step_diagnostics

    cfg = _cfg(tiny_model_dir, tmp_path / "d", 1, ["algorithm.head_step_max_gain=1e9"])
    rows = head_step_diagnostics(cfg)
    head = tiny_model().mar.head
    head.set_sampling_steps(cfg.sampling.diffusion_steps)
    assert [r["head_step"] for r in rows] == [j for j in range(head.num_steps) if head.is_stochastic(j)]
    assert sum(r["grad_share"] for r in rows) == pytest.approx(1.0)
    assert all(r["scored"] and r["score_gain"] == pytest.approx(head.score_gain(r["head_step"])) for r in rows)
    assert all(0.0 <= r["clamped"] <= 1.0 and r["max_log_ratio"] > 0 for r in rows)


def test_gradient_agreement_statistics_hand_worked_and_on_a_run(tiny_model_dir, tmp_path):
    from margrpo.rl.diagnose import agreement_statistics, gradient_agreement

    same = agreement_statistics(torch.tensor([[1.0, 2.0]] * 4))
    assert same["mean_pair_cosine"] == pytest.approx(1.0) and same["halves_cosine"] == pytest.approx(1.0)
    # (1,0), (0,1), (1,0), (0,1): pairs 0, 1, 0, 0, 1, 0 -> mean 1/3; halves' means both (0.5, 0.5) -> 1
    alt = agreement_statistics(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert alt["mean_pair_cosine"] == pytest.approx(1 / 3) and alt["halves_cosine"] == pytest.approx(1.0)
    ag = gradient_agreement(_cfg(tiny_model_dir, tmp_path / "a", 1), 4)
    assert ag["batches"] == 4 and ag["images_per_batch"] == 8 and -1 <= ag["mean_pair_cosine"] < 0.999
    with pytest.raises(ValueError, match="at least 4"):
        gradient_agreement(_cfg(tiny_model_dir, tmp_path / "b", 1), 2)


@pytest.mark.parametrize("estimator", ["matching", "nft"])
def test_forward_process_estimators_refuse_an_update_per_ar_step(estimator):
    """Their old terms are computed from the policy when an AR step is first scored; after an optimizer step per
    AR step the later steps' 'old' policy would already be updated."""
    with pytest.raises(ValueError, match="update='rollout'"):
        load_config(TrainConfig, None, [f"algorithm.estimator={estimator}", "algorithm.update=ar_step"])


def test_training_exceptions_cross_a_process_pool():
    """compare's worker processes send exceptions back pickled; a stop or fault must arrive as itself."""
    import pickle
    import signal
    from pathlib import Path

    from margrpo.rl.faults import StepFault, TrainingFault, TrainingStopped

    stopped = pickle.loads(pickle.dumps(TrainingStopped(4, signal.SIGTERM, Path("runs/x"))))
    assert (stopped.step, stopped.signum, str(stopped.out)) == (4, signal.SIGTERM, "runs/x")
    fault = pickle.loads(pickle.dumps(StepFault("non-finite loss", "step 2", float("nan"))))
    assert fault.where == "step 2" and str(fault).startswith("non-finite loss")
    assert str(pickle.loads(pickle.dumps(TrainingFault("3 bad steps")))) == "3 bad steps"


def test_resume_skips_a_truncated_checkpoint_and_still_ends_bit_identical(tiny_model_dir, tmp_path, capsys):
    full = Trainer(_cfg(tiny_model_dir, tmp_path / "full", 6), progress=False)
    full.run()
    Trainer(_cfg(tiny_model_dir, tmp_path / "crash", 4), progress=False).run()
    damaged = tmp_path / "crash" / "checkpoints" / "step-4" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # as a disk-full or killed copy leaves it
    resumed = Trainer(_cfg(tiny_model_dir, tmp_path / "crash", 6), progress=False)
    assert resumed.restore() == 2  # step 4's checkpoint is skipped for step 2's
    assert "skipping a damaged checkpoint" in capsys.readouterr().err and "optimizer.safetensors" in str(damaged)
    resumed = Trainer(_cfg(tiny_model_dir, tmp_path / "crash", 6), progress=False)
    resumed.run(resume=True)
    for a, b in zip(full.model.mar.parameters(), resumed.model.mar.parameters(), strict=True):
        assert torch.equal(a, b)
    drop = ("time/", "memory/")
    assert ([{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / "crash")]
            == [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / "full")])


def test_numerical_faults_skip_the_step_and_too_many_in_a_row_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    import margrpo.rl.trainer as trainer_mod
    from margrpo.rl.faults import TrainingFault
    from margrpo.utils.checkpoint import latest_checkpoint, load_checkpoint

    real_loss, real_sample = trainer_mod.ar_step_loss, trainer_mod.sample
    bad = {"loss": set(), "rollout": set()}
    current = {"step": -1}

    def loss(*args, **kw):
        sl = real_loss(*args, **kw)
        if current["step"] in bad["loss"]:
            sl.loss = sl.loss * float("nan")
        return sl

    def sample(*args, **kw):
        if current["step"] in bad["rollout"]:
            raise FloatingPointError("the diffusion head produced non-finite values")
        return real_sample(*args, **kw)

    monkeypatch.setattr(trainer_mod, "ar_step_loss", loss)
    monkeypatch.setattr(trainer_mod, "sample", sample)
    tr = Trainer(_cfg(tiny_model_dir, tmp_path / "skip", 4), progress=False)
    real_step = tr.train_step

    def step_with_index(step):
        current["step"] = step
        return real_step(step)

    tr.train_step = step_with_index
    bad["loss"], bad["rollout"] = {1}, {2}
    weights: list[dict] = []
    real_run_step = tr._run_step

    def run_step(step, writer, bar):
        real_run_step(step, writer, bar)
        weights.append({n: p.detach().clone() for n, p in tr.params})

    tr._run_step = run_step
    rows = {r["step"]: r for r in tr.run()}
    # steps 2 (a non-finite loss) and 3 (a non-finite rollout) are skipped: the weights stay those after step 1
    assert rows[2]["fault/skipped"] == 1.0 and rows[3]["fault/consecutive"] == 2.0 and "fault/skipped" not in rows[4]
    assert all(torch.equal(weights[0][n], weights[2][n]) for n in weights[0])
    assert not all(torch.equal(weights[2][n], weights[3][n]) for n in weights[0])

    # three in a row stop the run with a checkpoint of the last good weights
    bad["loss"], bad["rollout"] = {1, 2, 3}, set()
    tr = Trainer(_cfg(tiny_model_dir, tmp_path / "stop", 6), progress=False)
    tr.train_step = step_with_index
    with pytest.raises(TrainingFault, match="3 bad steps in a row.*last good step, 1"):
        tr.run()
    ckpt = latest_checkpoint(tmp_path / "stop")
    tensors, state = load_checkpoint(ckpt)
    assert state["step"] == 4 and state["bad_steps"] == 3
    first = Trainer(_cfg(tiny_model_dir, tmp_path / "one", 1), progress=False)
    current["step"] = -1
    first.train_step = step_with_index
    first.run()
    assert all(torch.equal(tensors["policy"][n], p) for n, p in first.params)

    # a KL bound: any KL above it makes the step bad
    bad["loss"] = set()
    tr = Trainer(_cfg(tiny_model_dir, tmp_path / "kl", 4, ["faults.max_kl=0.0"]), progress=False)
    with pytest.raises(TrainingFault, match="KL to the reference above faults.max_kl"):
        tr.run()
    # a log-ratio bound: the first PPO epoch has rho = 1 exactly, the second (after an update) does not
    tr = Trainer(_cfg(tiny_model_dir, tmp_path / "ratio", 4, ["faults.max_log_ratio=0.0"]), progress=False)
    with pytest.raises(TrainingFault, match=r"log-ratio above faults.max_log_ratio=0.0 \(.*\) at step 3, AR step \d+, "
                                            "PPO epoch 1"):
        tr.run()


def test_head_steps_follow_the_sampler_gain_only_where_the_policy_term_scores_them(tiny_model_dir, tmp_path):
    """The trajectory estimator scores the recorded transitions, whose noise gain grows with guidance / temperature
    (a cooler, guided sampler leaves fewer scorable steps); the forward-process estimators use the head steps only for
    the analytic KL, chosen at the unit gain, so a guided, cool rollout still trains them."""
    model = tiny_model()
    over = ["sampling.diffusion_steps=10", "sampling.guidance_scale=2.0", "sampling.temperature=0.5",
            "algorithm.head_step_max_gain=3.0"]
    model.mar.head.set_sampling_steps(10)
    unit = set(scorable_head_steps(model.mar.head, 3.0))
    for estimator in ("matching", "nft"):
        cfg = _cfg(tiny_model_dir, tmp_path / estimator, 1, [*over, f"algorithm.estimator={estimator}",
                                                            "algorithm.mte_k=0"])
        _, head_steps, _ = select_steps(cfg, model.mar, 0)
        assert head_steps and all(set(v) <= unit for v in head_steps.values())
    cfg = _cfg(tiny_model_dir, tmp_path / "trajectory", 1, [*over, "algorithm.mte_k=0"])
    with pytest.raises(ValueError, match="no head step has a score gain"):
        select_steps(cfg, model.mar, 0)
