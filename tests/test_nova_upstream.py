"""margrpo's NOVA against upstream's own code (baaivision/NOVA, read at 2cd254a), when a checkout is at hand.

Skipped unless `MARGRPO_NOVA_UPSTREAM` names a folder holding upstream's `diffnext/` package (nothing of it is
vendored). Upstream's model is built from the tiny folder's config with its tiny arch names registered, loads the
folder's transformer weights with `strict=True`, and runs the sampling path of `generate_video` / `generate_frame`
on the same inputs as margrpo's `condition` and head.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from nova_tiny import transformer_config, write_tiny_nova
from safetensors.torch import load_file

from margrpo.compat import nova

UPSTREAM = os.environ.get("MARGRPO_NOVA_UPSTREAM")
pytestmark = pytest.mark.skipif(not UPSTREAM or not (Path(UPSTREAM) / "diffnext").is_dir(),
                                reason="set MARGRPO_NOVA_UPSTREAM to a baaivision/NOVA checkout")


@pytest.fixture(scope="module")
def upstream():
    import diffusers  # noqa: F401  (imported before any scipy stand-in below, which they must not see)
    import transformers  # noqa: F401

    stub = False
    try:
        import scipy.stats  # noqa: F401
    except ImportError:  # upstream imports scipy.stats for its training-time mask ratio only
        stub = True
        stats = types.SimpleNamespace(truncnorm=None)
        sys.modules["scipy"] = types.ModuleType("scipy")
        sys.modules["scipy"].stats = stats
        sys.modules["scipy.stats"] = stats
    sys.path.insert(0, str(UPSTREAM))
    try:
        from diffnext.models.transformers import transformer_nova as tn
    finally:
        if stub:  # later imports (transformers' availability checks) must not see the stand-in
            del sys.modules["scipy"], sys.modules["scipy.stats"]

    for reg, name, spec in ((tn.VIDEO_ENCODERS, "vit_tiny_video", tn.video_encoder),
                            (tn.IMAGE_ENCODERS, "vit_tiny_image", tn.image_encoder),
                            (tn.IMAGE_DECODERS, "mlp_tiny", tn.image_decoder)):
        reg.register(name, **transformer_config()["_arch_specs"][name])(spec)
    return tn


def test_upstream_loads_our_folder_strictly_and_computes_the_same(upstream, tmp_path):
    folder = write_tiny_nova(tmp_path / "m")
    cfg = {k: v for k, v in transformer_config().items() if not k.startswith("_")}
    up = upstream.NOVATransformer3DModel(**cfg).eval()
    up.load_state_dict(load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")), strict=True)
    ours = nova.load(folder)
    assert set(up.state_dict()) == {k for k in ours.state_dict() if not k.startswith(("vae.", "text_encoder."))}
    g = torch.Generator().manual_seed(0)
    cond = ours.encode_prompts(["a red circle", "two blue squares"])
    lat = torch.randn(2, 4, 16, 16, generator=g)
    order = torch.rand(2, 64, generator=g).argsort(1)
    prev_ids = order[:, :23, None]
    with torch.no_grad():
        c = up.video_encoder.patch_embed(lat.clone())  # generate_video at t = 0
        c[:] = up.mask_embed.bos_token
        c = up.video_pos_embed(c.add_(up.video_pos_embed.get_time_embed(1)[0]))
        c = up.video_encoder(c, up.text_embed(cond.text))
        mask = torch.ones(2, 64, 1).scatter_(1, prev_ids, 0)
        up.mask_embed.mask = mask  # generate_frame after 23 predicted tokens
        z_up = up.image_encoder(up.mask_embed(up.image_encoder.patch_embed(lat.clone())), c, prev_ids)
        tokens = ours.patchify(lat)
        assert torch.equal(up.image_encoder.patch_embed.patchify(lat), tokens)
        assert torch.allclose(ours.compute_z(tokens, mask[..., 0], cond), z_up, atol=1e-5)
        xt, t = torch.randn(2, 4, 16, 16, generator=g), torch.full((2,), 734.0)
        v_up = up.image_decoder(xt, t, z_up)
        v = ours.head.net(ours.patchify(xt).reshape(-1, 16), t.repeat_interleave(64), z_up.reshape(-1, 32))
        assert torch.allclose(v.reshape(2, 64, 16), v_up, atol=1e-5)
        feats = [torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g)]
        assert torch.equal(up.text_embed.encode_prompts(feats), ours.encode_prompts(feats).text)


@pytest.mark.parametrize("shift,flow_shift", [(1.0, None), (3.0, None), (3.0, 2.0)])
def test_sigmas_equal_upstreams_own_scheduler(upstream, tmp_path, shift, flow_shift):
    from diffnext.schedulers.scheduling_cfm import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    if flow_shift:
        ref.set_shift(flow_shift)
    ref.set_timesteps(25)
    m = nova.load(write_tiny_nova(tmp_path / "m", shift=shift, text_encoder=False, vae=False), flow_shift=flow_shift)
    np.testing.assert_allclose(m.head.sigmas, np.array(ref.sigmas), atol=1e-6)
