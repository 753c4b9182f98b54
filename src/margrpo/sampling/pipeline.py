"""Prompts in, PIL images out (and the Rollout when asked): the user-facing sampling entry point."""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from margrpo.models.base import ImageModel
from margrpo.sampling.config import RecordPlan, SamplerConfig
from margrpo.sampling.rollout import Rollout
from margrpo.sampling.sampler import sample
from margrpo.utils.images import to_pil
from margrpo.utils.rng import make_generator


class MARPipeline:
    """`pipe(prompts, num_images_per_prompt=G) -> list[PIL.Image]`, rows ordered prompt-major.

    Randomness comes from `seed` through explicit generators, so the same call gives the same images.
    """

    def __init__(self, model: ImageModel, sampler: SamplerConfig | None = None):
        self.model = model
        self.sampler = sampler or SamplerConfig(ar_steps=16, diffusion_steps=None)  # the head's own step count

    @torch.no_grad()
    def __call__(self, prompts: list[str] | list[int], num_images_per_prompt: int = 1, seed: int = 0,
                 return_rollout: bool = False, progress: bool = False,
                 **sampler_overrides) -> list[Image.Image] | tuple[list[Image.Image], Rollout]:
        cfg = dataclasses.replace(self.sampler, **sampler_overrides)
        cond = self.model.encode_prompts(prompts)
        if cond is not None:
            cond = cond.repeat_interleave(num_images_per_prompt)
        n = len(prompts) * num_images_per_prompt
        dev = self.model.device
        rollout = sample(self.model.policy, cond, n, cfg, make_generator(seed, "sample", device=dev),
                         make_generator(seed, "mte", device=dev), progress=progress,
                         record=RecordPlan(record_z=True) if return_rollout else None)
        rollout.prompts = [str(p) for p in prompts for _ in range(num_images_per_prompt)]
        rollout.group = torch.arange(len(prompts)).repeat_interleave(num_images_per_prompt)
        images = to_pil(self.model.decode(rollout.tokens))
        return (images, rollout) if return_rollout else images
