"""Memory-flat MTE: the chunked trajectory loss has the unchunked loss, statistics and gradient."""

from __future__ import annotations

import pytest
import torch

from margrpo.rl.config import TrainConfig
from margrpo.rl.trainer import Trainer
from margrpo.utils.config import load_config

from conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(path)
    return path


MAR_GRPO = ["algorithm.mte_k=4", "algorithm.mte_top_fraction=0.3", "algorithm.policy_tokens=unknown",
            "algorithm.consistency=true"]


def _grads_and_metrics(model_dir, out, chunk: int, extra: list[str]) -> tuple[list[torch.Tensor], dict]:
    cfg = load_config(TrainConfig, None, [
        f"model={model_dir}", f"out_dir={out}", "steps=1", "rewards={colour_fraction: 1.0}",
        "algorithm.prompts_per_step=2", "algorithm.group_size=4", "sampling.ar_steps=4", "sampling.diffusion_steps=6",
        "algorithm.head_steps_per_ar_step=3", "algorithm.ar_step_count=2", "algorithm.ppo_epochs=1",
        "algorithm.beta=0.1", "log.tensorboard=false", *MAR_GRPO, *extra,
        f"algorithm.chunk_head_steps={chunk}"])
    tr = Trainer(cfg, progress=False)
    grads: list[torch.Tensor] = []

    def capture() -> float:
        grads.extend(p.grad.clone() for _, p in tr.params)
        tr.opt.zero_grad(set_to_none=True)
        return 0.0

    tr._optimizer_step = capture
    return grads, tr.train_step(0)


# tolerance: float32 sums over (1 + K) x J chunks in another order; measured differences are ~1e-9 absolute
@pytest.mark.parametrize("extra", [[], ["algorithm.train=both", "algorithm.normalize=token"],
                                   ["algorithm.batch_ar_steps=true", "algorithm.normalize=rollout",
                                    "algorithm.kl=reference"]],
                         ids=["mar-grpo", "head-trains+token-norm", "batched+rollout-norm"])
def test_chunked_mte_loss_has_the_unchunked_gradient(tiny_model_dir, tmp_path, extra):
    g0, m0 = _grads_and_metrics(tiny_model_dir, tmp_path / "a", 0, extra)
    g1, m1 = _grads_and_metrics(tiny_model_dir, tmp_path / "b", 1, extra)
    assert len(g0) == len(g1) and any(g.abs().sum() > 0 for g in g0)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)
    for k in ("loss/policy", "loss/kl", "ratio/mean", "ratio/max", "mte/ratio_max", "mte/token_fraction",
              "clip_fraction", "elements"):
        # loss/policy is -mean(A) ~ 0 at ratio 1: a sum of O(1) terms that cancel, so its error is absolute
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-5), k


def test_chunking_refuses_the_options_that_couple_chunks():
    for opt in ("algorithm.ratio_level=image", "algorithm.head_step_weighting=std"):
        with pytest.raises(ValueError, match="chunk_head_steps"):
            load_config(TrainConfig, None, ["algorithm.chunk_head_steps=1", opt])
