"""The two interfaces every model family implements; the sampler, replay, objective and trainer see only these.

* `Policy` (an `nn.Module`): what RL trains. `forward(tokens, mask, cond, drop)` returns the per-token head
  input z; the policy owns its diffusion head (`head`), its generation order and AR schedule
  (`sample_orders`, `mask_schedule`), its pretraining loss and its named parameter groups ("ar", "head").
  The sampler and replay call the module itself (and the head module itself), never a helper method, because
  DDP all-reduces gradients, and FSDP2 unshards parameters, only around a registered module's `forward`.
* `ImageModel` (an `nn.Module`): a policy packaged with what turns prompts into a condition object and tokens into
  images, and a folder format. The condition is opaque to the sampler (class labels, text features, an LLM's
  prompt cache): it is only batched with `cat`, `repeat_interleave` and `detach`, and handed back to the policy.

`ImageModel` also exposes the policy's members that the model-family adapters' public contract shares
(`seq_len`, `token_embed_dim`, `head`, `condition`, `mask_schedule`, `patchify`, `unpatchify`), so a loaded model
is used the same way whichever family it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from margrpo.models.ar_schedule import mask_schedule
from margrpo.models.heads import DiffusionHead

PARAMETER_GROUPS = ("ar", "head")


class Policy(nn.Module):
    """A masked autoregressive transformer with its per-token diffusion head.

    Conventions (shared by every family): `mask` [B, L] is float with 1 = unknown, every row with the same number
    of known tokens (or the family handles ragged rows); z does not depend on token values at unknown positions;
    `cond=None`, or `drop[b] = True`, gives row b the family's unconditional prompt; no state survives a call.
    """

    seq_len: int
    token_embed_dim: int
    # guidance over AR steps when a sampler config leaves it open: MAR's (and LTH14's) linear ramp; NOVA and Harmon
    # guide with a constant scale upstream
    default_guidance_schedule: str = "linear"

    @property
    def head(self) -> DiffusionHead:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, cond=None,
                drop: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        """The head's per-token input z [B, L, D] for a canvas `tokens` [B, L, C] and `mask` [B, L] (1 = unknown)."""
        raise NotImplementedError

    def compute_z(self, tokens: torch.Tensor, mask: torch.Tensor, cond=None,
                  drop: torch.Tensor | None = None) -> torch.Tensor:
        """The module call under the name the model-family contract shares (`model.compute_z(tokens, mask, labels)`).

        Not upstream's: LTH14/mar's `MAR.forward(imgs, labels)` returns its training loss; here the pretraining
        loss is `pretrain_loss` and the module call is z.
        """
        return self(tokens, mask, cond, drop)

    def mask_schedule(self, num_steps: int, seq_len: int | None = None) -> list[int]:
        """Tokens predicted at each of `num_steps` AR steps, each >= 1, summing to `seq_len` (default: all).

        MAR's cosine schedule by default; a family with another one overrides this.
        """
        return mask_schedule(num_steps, self.seq_len if seq_len is None else seq_len)

    def sample_orders(self, bsz: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """A uniformly random generation order per image: [B, L] permutations of the positions."""
        return torch.rand(bsz, self.seq_len, generator=generator, device=device).argsort(dim=1)

    def pretrain_loss(self, tokens: torch.Tensor, cond, generator: torch.Generator | None = None,
                      drop_conditions: bool | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        """The family's pretraining objective on clean tokens (PPO-ptx and `margrpo pretrain`)."""
        raise NotImplementedError

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the transformer's block activations during backward instead of storing them (`gradient_
        checkpointing`): memory for one extra forward. One method per family so the trainer needs no family
        knowledge; the gradient is the same because RL runs without dropout (the re-forward sees the same function).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement gradient checkpointing")

    def lora_target_modules(self) -> str:
        """peft's `target_modules` for `algorithm.train: lora`: a regex full-matched against module names, the
        transformer's attention and MLP linears, never the diffusion head (frozen under LoRA) nor what the family keeps
        out of RL (Harmon's LLM)."""
        raise NotImplementedError(f"{type(self).__name__} names no LoRA targets (Policy.lora_target_modules)")

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by group, a partition of the policy's: "head" is the diffusion head's, "ar" the
        transformer's (`algorithm.train` picks "ar", "head" or both). By default "ar" is everything but the head; a
        family may set parts apart in groups of its own that RL does not train (Harmon's "llm")."""
        head = {id(p) for p in self.head.parameters()}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in PARAMETER_GROUPS}
        for name, p in self.named_parameters():
            groups["head" if id(p) in head else "ar"].append((name, p))
        return groups


class ImageModel(nn.Module):
    """A policy, its prompt encoding, its token codec (pixels or a VAE) and its folder format."""

    @property
    def policy(self) -> Policy:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @property
    def image_size(self) -> int:  # pragma: no cover - abstract
        """The side of the square images `decode` returns, in pixels."""
        raise NotImplementedError

    def encode_prompts(self, prompts):  # pragma: no cover - abstract
        """Prompts (or class labels) -> the family's condition object; None stays None (unconditional)."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Tokens [B, L, C] -> images [B, 3, H, W] clamped to [-1, 1]; the argument is not modified."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        """Images [B, 3, H, W] in [-1, 1] -> tokens [B, L, C]."""
        raise NotImplementedError

    def save_pretrained(self, path: str | Path, metadata: dict | None = None) -> Path:  # pragma: no cover
        """Write the model as a folder that `load_pretrained` (and a config's `model:`) reads back exactly."""
        raise NotImplementedError

    @classmethod
    def load_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> ImageModel:  # pragma: no cover
        """The folder `save_pretrained` (or a converter) wrote, strictly, in eval mode on `device`."""
        raise NotImplementedError

    def trainable_parameters(self, which: str) -> list[tuple[str, nn.Parameter]]:
        """Freeze everything, then unfreeze the policy's "ar" group, its "head" group, or "both"; full names.

        The prompt encoder and the codec stay frozen: conditions and tokens are computed once per rollout.
        "lora" unfreezes only the policy's LoRA adapters (`margrpo.models.lora.add_lora` injects them first).
        """
        if which not in (*PARAMETER_GROUPS, "both", "lora"):
            raise ValueError(f"trainable group {which!r}; valid: {', '.join(PARAMETER_GROUPS)}, both, lora")
        if which == "lora":
            wanted = {id(p) for n, p in self.policy.named_parameters() if ".lora_" in n}
            if not wanted:
                raise ValueError("trainable group 'lora': the policy has no LoRA adapters (margrpo.models.lora)")
        else:
            chosen = PARAMETER_GROUPS if which == "both" else (which,)
            wanted = {id(p) for g, ps in self.policy.parameter_groups().items() if g in chosen for _, p in ps}
        for p in self.parameters():
            p.requires_grad_(False)
        out = []
        for name, p in self.named_parameters():
            if id(p) in wanted:
                p.requires_grad_(True)
                out.append((name, p))
        return out

    # ---------------------------------------------------------------- the policy's shared members
    @property
    def seq_len(self) -> int:
        return self.policy.seq_len

    @property
    def token_embed_dim(self) -> int:
        return self.policy.token_embed_dim

    @property
    def head(self) -> DiffusionHead:
        return self.policy.head

    def compute_z(self, tokens: torch.Tensor, mask: torch.Tensor, cond=None,
                  drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.policy(tokens, mask, cond, drop)

    def mask_schedule(self, num_steps: int, seq_len: int | None = None) -> list[int]:
        return self.policy.mask_schedule(num_steps, seq_len)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        return self.policy.patchify(latents)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.policy.unpatchify(tokens)
