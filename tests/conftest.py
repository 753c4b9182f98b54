"""Shared fixtures: tiny models sized for a 2-core CPU, and one thread so tests are quick and deterministic."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def tiny_mar_kwargs(**over) -> dict:
    """A MAR small enough to run many times per test (32x32 pixels as 4x4 patches: 64 tokens x 48 dims)."""
    kw = dict(img_size=32, vae_stride=1, patch_size=4, vae_embed_dim=3, encoder_embed_dim=32, encoder_depth=2,
              encoder_num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, buffer_size=4,
              diffloss_d=2, diffloss_w=32, class_num=10, num_sampling_steps="8", clip_denoised=True)
    kw.update(over)
    return kw


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (upstream zero-inits the head's output layer, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_kwargs():
    return tiny_mar_kwargs


def tiny_model(seed: int = 0):
    """A tiny text-to-image model whose zero-initialised head layers are perturbed (so z matters)."""
    from margrpo.models.mar.factory import ModelSpec, build_model
    from margrpo.worlds.shapes.pretrain import vocabulary

    spec = ModelSpec(width=32, depth=1, num_heads=2, head_width=32, head_depth=1, diffusion_steps=6, text_dim=16)
    torch.manual_seed(seed)  # only the module initialisers (the loaders fork the global RNG, tests/test_families.py)
    model = build_model(spec, vocabulary())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.mar.diffloss.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model



@pytest.fixture(autouse=True)
def _result_cache_in_tmp(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's result cache (~/.cache/margrpo): the base model's sampler grids go to a
    folder of the test session (a test that needs an empty cache sets its own)."""
    monkeypatch.setenv("MARGRPO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "result-cache"))


def sampling(record: bool = True, **kw):
    """The sampler's two objects from one set of keyword arguments: a `SamplerConfig` (16 AR steps and the head's own
    step count unless told) and, with `record`, a `RecordPlan` (every step recorded, with z, unless told)."""
    import dataclasses

    from margrpo.sampling.config import RecordPlan, SamplerConfig

    names = {f.name for f in dataclasses.fields(SamplerConfig)}
    cfg = SamplerConfig(**{"ar_steps": 16, "diffusion_steps": None, **{k: v for k, v in kw.items() if k in names}})
    plan = RecordPlan(**{"record_z": True, **{k: v for k, v in kw.items() if k not in names}}) if record else None
    return cfg, plan


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model()` written as a model folder (what a config's `model:` names)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(path)
    return path
