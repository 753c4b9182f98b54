"""Training options around the objective: gradient checkpointing, bf16 autocast, LoRA adapters and W&B logging.

Each is a switch that must not change what is optimised: the checkpointed gradient equals the stored one, bf16
keeps the RL statistics float32 and close to float32's, LoRA leaves the ratio-is-1 invariant and resume intact.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES

from margrpo.rl.advantages import group_advantages
from margrpo.rl.config import AlgorithmSection
from margrpo.rl.loss import ar_step_loss
from margrpo.sampling.sampler import sample

from conftest import sampling

ADV = (torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))


def _rollout(model, prompts, **cfg):
    cond = model.encode_prompts(list(prompts)).repeat_interleave(3)
    scfg, plan = sampling(ar_steps=4, record_z=False, **cfg)
    return sample(model.policy, cond, 6, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
                  record=plan)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_checkpointing_gives_the_stored_gradient(family, monkeypatch):
    """`Policy.set_gradient_checkpointing(True)` (every family, Harmon's LLM segment included) recomputes the same
    function in backward, so the AR group's gradient is unchanged."""
    import torch.utils.checkpoint as tuc

    fam = FAMILIES[family]
    grads, calls = [], []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for enabled in (False, True):
        calls.clear()
        model = fam.build()
        model.trainable_parameters("ar")
        model.policy.set_gradient_checkpointing(enabled)
        r = _rollout(model, fam.prompts)
        adv = group_advantages(*ADV)
        js = [j for j in range(model.head.num_steps) if model.head.is_stochastic(j)][:2]
        sl = ar_step_loss(model.policy, None, r, 1, js, adv.values, adv.use, AlgorithmSection(beta=0.0), {}, True)
        sl.loss.backward()
        assert bool(calls) == enabled  # checkpointing is on exactly when asked for
        grads.append({n: p.grad.clone() for n, p in model.policy.parameter_groups()["ar"] if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def _bf16(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_autocast_keeps_rl_statistics_float32_and_close_to_float32(family):
    """Under `autocast: bf16` (the trainer's `_autocast` on CPU) the rollout's log-probabilities, the advantages, the
    replayed log-probs, the KL and the loss are float32, and a bf16 rollout replayed under bf16 has ratio 1.

    Against float32 on the same (float32) rollout, measured on the tiny MAR and NOVA families (first three stochastic
    head steps): z relative error 8.7e-4 to 5.9e-3 (bf16 keeps 8 mantissa bits, ~4e-3 relative rounding, over a few
    layers), mean |d log-prob| 3.8e-4 to 9.2e-4 nats per element (NOVA the largest), KL relative 5.7e-4 to 4.6e-3
    (NOVA). The tolerances below, 2e-2 / 5e-3 / 2e-2, are 3-5x the worst measured: loose enough for other CPUs'
    kernels, tight enough that a log-prob or KL computed in bf16 (errors ~1e-2 relative) would fail. The
    element-wise *maximum* |d log-prob| reaches 1.3 nats (a 0.5% z error times a low-noise head step's score
    gain; ratios 0.27 to 3.5), which is why the trainer scores bf16 rollouts
    under bf16 too: a rollout must be replayed in the precision it was sampled in, never compared element-wise
    across precisions. Harmon is checked for dtypes and the ratio only: its tiny random LLM amplifies bf16 rounding
    (mean |d log-prob| ~20 nats at the first head step against float32), so no float32 tolerance is claimed for it.
    """
    import copy

    from margrpo.rl.loss import replay_transitions, step_z
    from margrpo.rl.loss_terms import kl_terms

    fam = FAMILIES[family]
    model = fam.build()
    model.trainable_parameters("ar")
    policy = model.policy
    reference = copy.deepcopy(policy).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a reference away from the policy, so the KL is not 0
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    adv = group_advantages(*ADV)
    assert adv.values.dtype == torch.float32
    js = [j for j in range(policy.head.num_steps) if policy.head.is_stochastic(j)][:3]
    ocfg = AlgorithmSection(beta=0.1, policy_tokens="unknown", mte_k=3, mte_top_fraction=0.3)
    rollouts = {}
    for bf in (False, True):
        with _bf16(bf):
            rollouts[bf] = _rollout(model, fam.prompts, mte_k=3, policy_tokens="unknown")
    rec = rollouts[True].steps[1]
    assert rec.logp.dtype == torch.float32 and rec.mte_logp.dtype == torch.float32
    with _bf16():
        sl = ar_step_loss(policy, reference, rollouts[True], 1, js, adv.values, adv.use, ocfg, {}, first_epoch=True)
    assert sl.loss.dtype == torch.float32 and torch.isfinite(sl.loss)
    for k in ("ratio/max", "ratio/min", "mte/ratio_max", "mte/ratio_min"):  # sampled and replayed in bf16
        assert abs(sl.stats[k] - 1) < 1e-5, (k, sl.stats[k])

    r32 = rollouts[False]
    out = {}
    for bf in (False, True):
        with torch.no_grad(), _bf16(bf):
            sc, rsc = step_z(policy, r32, 1), step_z(reference, r32, 1)
            st = replay_transitions(policy.head, r32.steps[1].x, js, sc, r32.temperature)
            kl = kl_terms(st, replay_transitions(reference.head, r32.steps[1].x, js, rsc, r32.temperature), "gaussian")
        assert st.logp.dtype == torch.float32 and kl.dtype == torch.float32 and sc.z.dtype == torch.float32
        out[bf] = (sc.z, st.logp, kl)
    if family == "harmon":
        return
    (z32, lp32, kl32), (z16, lp16, kl16) = out[False], out[True]
    assert float((z16 - z32).norm() / z32.norm()) < 2e-2
    assert float((lp16 - lp32).abs().mean()) < 5e-3
    assert abs(float(kl16.mean()) - float(kl32.mean())) < 2e-2 * float(kl32.mean())


# ---------------------------------------------------------------------------------------------------------- LoRA
def _with_adapters(model, seed: int = 0):
    """Adapters on the family's default targets, with B random and non-zero (peft zero-inits B, which would make
    the adapters invisible to every test below)."""
    from margrpo.models.lora import add_lora, lora_layers

    names = add_lora(model.policy, 4, 8.0, model.policy.lora_target_modules(), torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model.policy):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_adapters_keep_the_ratio_at_one_and_only_they_get_gradients(family):
    """The adapted policy is still the module the sampler and replay call: ratio 1 and its own KL 0 before any
    update, the default targets avoid the head (and Harmon's LLM), and only adapter weights are trainable."""
    import copy

    fam = FAMILIES[family]
    model = fam.build()
    names = _with_adapters(model)
    head_path = next(name for name, m in model.policy.named_modules() if m is model.policy.head)
    assert names and not any(n.startswith(head_path + ".") or n.startswith("llm.") for n in names)
    trainable = model.trainable_parameters("lora")
    assert trainable and all(".lora_" in n for n, _ in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in trainable}
    policy = model.policy
    reference = copy.deepcopy(policy).eval()
    r = _rollout(model, fam.prompts, mte_k=3, policy_tokens="unknown")
    adv = group_advantages(*ADV)
    js = [j for j in range(policy.head.num_steps) if policy.head.is_stochastic(j)][:3]
    ocfg = AlgorithmSection(beta=0.1, policy_tokens="unknown", mte_k=3, mte_top_fraction=0.3)
    for i in range(4):
        sl = ar_step_loss(policy, reference, r, i, js, adv.values, adv.use, ocfg, {}, first_epoch=True)
        for k in ("ratio/max", "ratio/min", "mte/ratio_max", "mte/ratio_min"):
            assert abs(sl.stats[k] - 1) < 1e-5, (i, k, sl.stats[k])
        assert sl.stats["loss/kl"] == pytest.approx(0.0, abs=1e-10)
        sl.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert sum(float(p.grad.abs().sum()) for _, p in trainable if p.grad is not None) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_merged_export_is_a_plain_folder_with_the_adapted_z(family, tmp_path):
    from margrpo.models.lora import lora_layers, merged

    fam = FAMILIES[family]
    model = fam.build()
    plain_keys = set(model.state_dict())
    _with_adapters(model)
    g = torch.Generator().manual_seed(3)
    cond = model.encode_prompts(list(fam.prompts))
    tokens = torch.randn(2, model.seq_len, model.token_embed_dim, generator=g)
    mask = (torch.rand(2, model.seq_len, generator=g).argsort(1) < model.seq_len // 2).float()
    with torch.no_grad():
        z = model.policy(tokens, mask, cond)
        with merged(model.policy):
            assert set(model.state_dict()) == plain_keys and not lora_layers(model.policy)
            model.save_pretrained(tmp_path / "m")
        assert lora_layers(model.policy) and torch.equal(model.policy(tokens, mask, cond), z)  # adapters back
        again = type(model).load_pretrained(tmp_path / "m")
        assert not any(".lora_" in k or "base_layer" in k for k in again.state_dict())
        z_merged = again.policy(tokens, mask, again.encode_prompts(list(fam.prompts)))
    assert torch.allclose(z_merged, z, atol=1e-5, rtol=1e-4), float((z_merged - z).abs().max())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(path)
    return path


def _lora_cfg(model_dir, out, steps, extra=()):
    from margrpo.rl.config import TrainConfig
    from margrpo.utils.config import load_config

    return load_config(TrainConfig, None, [
        f"model={model_dir}", f"out_dir={out}", f"steps={steps}", "rewards={colour_fraction: 1.0}",
        "algorithm.prompts_per_step=2", "algorithm.group_size=4", "sampling.ar_steps=4", "sampling.diffusion_steps=6",
        "algorithm.head_steps_per_ar_step=2", "algorithm.ppo_epochs=2", "log.checkpoint_every=2",
        "log.sample_every=100", "log.tensorboard=false", "optim.lr=3e-2", "algorithm.train=lora",
        "algorithm.lora_rank=2", *extra])


def test_lora_run_trains_only_adapters_checkpoints_them_and_resumes_exactly(tiny_model_dir, tmp_path):
    from margrpo.models.loading import load_model
    from margrpo.rl.trainer import Trainer
    from margrpo.utils.checkpoint import latest_checkpoint, load_checkpoint
    from margrpo.utils.metrics import read_metrics

    full = Trainer(_lora_cfg(tiny_model_dir, tmp_path / "full", 4), progress=False)
    base = {n: p.detach().clone() for n, p in full.model.named_parameters() if ".lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in full.params}
    assert adapters and all(".lora_" in n for n in adapters)
    assert {id(p) for g in full.state.opt.param_groups for p in g["params"]} == {id(p) for _, p in full.params}
    full.run()
    after = dict(full.model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)  # the base model (head included) is untouched
    assert any(not torch.equal(adapters[n], after[n]) for n in adapters if "lora_B" in n)
    tensors, _ = load_checkpoint(latest_checkpoint(tmp_path / "full"), device="cpu")
    assert set(tensors["policy"]) == set(adapters)  # the checkpoint holds the adapters only
    # "crash" after step 2, resume to 4: the same adapters and the same logged rows
    Trainer(_lora_cfg(tiny_model_dir, tmp_path / "crash", 2), progress=False).run()
    resumed = Trainer(_lora_cfg(tiny_model_dir, tmp_path / "crash", 4), progress=False)
    resumed.run(resume=True)
    for (na, a), (nb, b) in zip(full.params, resumed.params, strict=True):
        assert na == nb and torch.equal(a, b), na
    drop = ("time/", "memory/")
    rows = [[{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / d)]
            for d in ("full", "crash")]
    assert rows[0] == rows[1]
    # the exported model is a plain folder with the adapters merged
    exported = load_model(str(tmp_path / "full" / "model"), "cpu")
    assert not any(".lora_" in k or "base_layer" in k for k in exported.state_dict())
    cond = exported.encode_prompts(["a red circle"])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, exported.seq_len, exported.token_embed_dim, generator=g)
    mask = (torch.rand(1, exported.seq_len, generator=g).argsort(1) < exported.seq_len // 2).float()
    from_run = load_model(str(tmp_path / "full"), "cpu")  # the run directory: base + latest adapters, merged
    assert not any(".lora_" in k or "base_layer" in k for k in from_run.state_dict())
    with torch.no_grad():
        z = full.model.policy(tokens, mask, cond)
        assert torch.allclose(exported.policy(tokens, mask, cond), z, atol=1e-5)
        assert torch.allclose(from_run.policy(tokens, mask, cond), z, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- W&B
def test_wandb_offline_gets_the_metrics_rows_from_rank_zero(tiny_model_dir, tmp_path, monkeypatch):
    """`log.wandb: true` with W&B's WANDB_MODE=offline runs without a network and forwards exactly the rows of
    metrics.jsonl; the offline run lands in WANDB_DIR and a resume continues the same W&B run id."""
    pytest.importorskip("wandb")
    from margrpo.rl.trainer import Trainer
    from margrpo.utils import wandb_log
    from margrpo.utils.metrics import read_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent: list[dict] = []
    real_log = wandb_log.WandbMirror.log
    monkeypatch.setattr(wandb_log.WandbMirror, "log", lambda self, row: (sent.append(dict(row)), real_log(self, row)))
    extra = ["log.wandb=true", "algorithm.train=ar"]
    Trainer(_lora_cfg(tiny_model_dir, tmp_path / "run", 2, extra), progress=False).run()
    assert sent and sent == read_metrics(tmp_path / "run")
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "run" / wandb_log.ID_FILE).read_text().strip()
    assert runs[0].name.endswith(run_id)
    sent.clear()
    Trainer(_lora_cfg(tiny_model_dir, tmp_path / "run", 3, extra), progress=False).run(resume=True)
    assert sent == read_metrics(tmp_path / "run")[2:]  # the resumed run's new row, under the same id
    assert (tmp_path / "run" / wandb_log.ID_FILE).read_text().strip() == run_id


def test_wandb_is_not_started_off_rank_zero(monkeypatch):
    from margrpo.utils import wandb_log

    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.get_rank", lambda: 1)
    assert not wandb_log.is_rank_zero()
    monkeypatch.setattr("torch.distributed.get_rank", lambda: 0)
    assert wandb_log.is_rank_zero()


def test_the_gradient_checkpointing_key_reaches_the_policy(tiny_model_dir, tmp_path):
    from margrpo.rl.trainer import Trainer

    for enabled in (False, True):
        extra = ["algorithm.train=ar", f"gradient_checkpointing={str(enabled).lower()}"]
        tr = Trainer(_lora_cfg(tiny_model_dir, tmp_path / f"r{enabled}", 1, extra), progress=False)
        assert tr.model.policy.config.grad_checkpointing is enabled
