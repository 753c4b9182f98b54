"""Harmon's policy (Wu et al. 2025; wusize/Harmon): a MAR encoder and decoder around a Qwen2.5 LLM, LTH14's DDPM
head.

`HarmonPolicy` is the `Policy`: it holds one of our `MARPolicy` modules (LTH14 parameter names, so upstream's `mar.*`
keys load as they are) and calls its `forward_mae_encoder` / `forward_mae_decoder` pieces with the LLM in between,
as upstream's `Harmon.forward_mae_encoder`:

    x_enc = MAR encoder(known tokens, `fake_latent` in every buffer row)
    h     = LLM(proj_in(x_enc) as [visible tokens in raster order; buffer], prompt KV cache,
                positions continuing at each row's number of real prompt tokens, pad keys masked)
    z     = MAR decoder(x_enc + proj_out(h back in encoder order))

The `ImageModel` around it (prompt template, tokenizer, VAE, the folder format) is `model.HarmonImageModel`.
"""

from __future__ import annotations

import inspect

import torch
import torch.utils.checkpoint
from torch import nn

from margrpo.models.base import Policy
from margrpo.models.harmon.condition import HarmonCondition, make_cache, trim_cache
from margrpo.models.heads import DiffusionHead
from margrpo.models.mar.model import LORA_TARGETS as MAR_LORA_TARGETS
from margrpo.models.mar.model import MARPolicy

__all__ = ["CFG_PROMPT", "PROMPT_TEMPLATE", "HarmonPolicy", "build_mlp", "format_prompt"]

# upstream's `prompt_template["INSTRUCTION"]` (configs/models/*.py) and the prompt wrapping of scripts/text2image.py
PROMPT_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
CFG_PROMPT = "Generate an image."


def format_prompt(prompt: str) -> str:
    """The text the tokenizer sees for a user prompt: no system turn, not `apply_chat_template` (upstream's)."""
    return PROMPT_TEMPLATE.format(input=f"Generate an image: {prompt}")


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """Upstream's projector: Linear, SiLU, Linear (keys `.0.*` and `.2.*`)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, z_dim))


def _cache_kwarg(llm_model: nn.Module, cache) -> dict:
    """The cache argument under the name this transformers takes: `cache` (5.x), `past_key_values` (4.x, and 5.x
    before 5.40 with a deprecation warning)."""
    params = inspect.signature(type(llm_model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


class HarmonPolicy(Policy):
    """Harmon's text-to-image path as a `Policy`: `policy(tokens, mask, cond, drop)` -> z [B, L, D_dec].

    `cond` is a `HarmonCondition` (its prompt cache is used and trimmed back to the prompt after every call),
    `None` for the unconditional prompt "Generate an image." in the same template, and `drop[b]` gives row b that
    prompt. Only `mar.*` is in the trainable groups: the LLM and the projectors are frozen, as in MAR-GRPO's Harmon
    runs (the prompt cache is computed once per rollout, so a trained LLM would condition on a stale prompt).
    """

    default_guidance_schedule = "constant"  # upstream's Harmon guides with a constant scale by default

    def __init__(self, llm: nn.Module, mar: MARPolicy, uncond_input_ids: torch.Tensor):
        super().__init__()
        hidden = int(llm.config.hidden_size)
        d_enc = mar.config.encoder_embed_dim
        self.llm = llm
        self.mar = mar
        self.proj_in = build_mlp(d_enc, hidden, hidden)
        self.proj_out = build_mlp(hidden, hidden, d_enc)
        # a plain attribute (no buffer): the ImageModel moves the shared sub-modules, not this object
        self.uncond_input_ids = uncond_input_ids.long().reshape(1, -1).cpu()
        side = mar.config.seq_h
        self._image_shape = (side, side)
        self.token_embed_dim = mar.config.token_dim
        self.llm_checkpointing = False  # `set_gradient_checkpointing`

    # ---------------------------------------------------------------- geometry
    @property
    def image_shape(self) -> tuple[int, int]:
        """(m, n) token grid; the native grid by default, another one interpolates the position embeddings."""
        return self._image_shape

    @image_shape.setter
    def image_shape(self, shape: tuple[int, int]) -> None:
        m, n = (int(v) for v in shape)
        if m < 1 or n < 1:
            raise ValueError(f"image_shape must be two positive ints, got {shape}")
        self._image_shape = (m, n)

    @property
    def seq_len(self) -> int:  # type: ignore[override]
        m, n = self._image_shape
        return m * n

    @property
    def head(self) -> DiffusionHead:
        """LTH14's DDPM head, `mar.diffloss` (upstream's key names)."""
        return self.mar.diffloss

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, c, m*p, n*p] -> [B, m*n, c*p*p], upstream's `b c (m p) (n q) -> b (m n) (c p q)`."""
        b, c, h, w = latents.shape
        p = self.mar.config.patch_size
        x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify` on the current `image_shape` grid."""
        b = tokens.shape[0]
        m, n = self._image_shape
        p = self.mar.config.patch_size
        c = tokens.shape[-1] // (p * p)
        x = tokens.reshape(b, m, n, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, m * p, n * p)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """MAR's blocks through its config, and the LLM call as one checkpointed segment.

        Not transformers' `gradient_checkpointing_enable`: its layers drop the KV cache (`use_cache=False`) when
        checkpointing in train mode, which would lose the prompt, and do nothing in eval mode (the trainer's). The
        LLM is frozen but gradients pass through it to `mar`, so its activations are the larger part of the memory;
        the segment re-runs `_llm` (which extends and trims the prompt cache back) during backward.
        """
        self.mar.set_gradient_checkpointing(enabled)
        self.llm_checkpointing = bool(enabled)

    def lora_target_modules(self) -> str:
        """MAR's transformer linears under `mar.`; never the LLM or the projectors, which RL keeps frozen."""
        return r"mar\." + MAR_LORA_TARGETS

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """"head" = `mar.diffloss`, "ar" = the rest of `mar`, "llm" = the LLM and `proj_in`/`proj_out`, which RL
        does not train: the prompt's KV cache is computed once per rollout, and a trained LLM would condition
        every later call on a stale prompt."""
        head = {id(p) for p in self.head.parameters()}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"ar": [], "head": [], "llm": []}
        for name, p in self.named_parameters():
            group = ("head" if id(p) in head else "ar") if name.startswith("mar.") else "llm"
            groups[group].append((name, p))
        return groups

    # ---------------------------------------------------------------- prompts
    @property
    def _device(self) -> torch.device:
        return self.mar.fake_latent.device

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> HarmonCondition:
        """The prompt's KV cache: the LLM over all T positions, no attention mask, positions 0..T-1 (upstream)."""
        input_ids = input_ids.to(self._device)
        cache = make_cache([])
        self.llm.model(input_ids=input_ids, use_cache=True, return_dict=True, **_cache_kwarg(self.llm.model, cache))
        return HarmonCondition(input_ids, attention_mask.to(self._device), cache)

    def unconditional(self, bsz: int) -> HarmonCondition:
        """The unconditional prompt ("Generate an image." in the template) for `bsz` rows, prefilled afresh."""
        ids = self.uncond_input_ids.to(self._device)
        return self.prefill(ids, torch.ones_like(ids, dtype=torch.bool)).repeat_interleave(bsz)

    def _resolve(self, cond: HarmonCondition | None, drop: torch.Tensor | None, bsz: int) -> HarmonCondition:
        if cond is None:
            return self.unconditional(bsz)
        if not isinstance(cond, HarmonCondition):
            raise TypeError(f"Harmon is conditioned on a HarmonCondition (model.encode_prompts), got "
                            f"{type(cond).__name__}")
        if len(cond) != bsz:
            raise ValueError(f"condition batch {len(cond)} does not match token batch {bsz}")
        if drop is None or not bool(drop.any()):
            return cond
        if bool(drop.all()):
            return self.unconditional(bsz)
        return cond.where(drop, self.unconditional(bsz))

    # ---------------------------------------------------------------- the condition
    def _llm(self, z_enc: torch.Tensor, valid: torch.Tensor | None, cond: HarmonCondition) -> torch.Tensor:
        """The LLM over the encoder tokens with the prompt cache; returns its hidden states in encoder order.

        Encoder rows are [buffer; known tokens; padding] (padding only for ragged batches, `valid`); the LLM reads
        [known tokens; buffer; padding], causally, so a row's padding never reaches its real tokens. Upstream's
        position ids are cumsum(mask) - 1 over [prompt mask; ones], i.e. image token k at (real prompt tokens) + k.
        """
        b, n, _ = z_enc.shape
        buf = self.mar.buffer_size
        dev = z_enc.device
        counts = valid.sum(1) if valid is not None else torch.full((b,), n, device=dev)
        j = torch.arange(n, device=dev)[None, :]
        counts = counts[:, None]
        # LLM position of each encoder position: known tokens first, then the buffer, then padding
        rank = torch.where(j < buf, counts - buf + j, torch.where(j < counts, j - buf, j))
        order = torch.argsort(rank, dim=1)  # encoder position at each LLM position
        seq = torch.gather(z_enc, 1, order[..., None].expand(-1, -1, z_enc.shape[-1]))
        keys = torch.cat([cond.attention_mask, (j < counts).expand(b, n)], dim=1)
        positions = cond.lengths[:, None] + j
        cache = cond.past_key_values
        try:
            out = self.llm.model(inputs_embeds=seq.to(self.llm.dtype), attention_mask=keys, position_ids=positions,
                                 use_cache=True, return_dict=True, **_cache_kwarg(self.llm.model, cache))
        finally:
            trim_cache(cache, cond.prompt_length)
        h = out.last_hidden_state
        return torch.gather(h, 1, rank[..., None].expand(-1, -1, h.shape[-1]))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, cond: HarmonCondition | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, L, D] for a canvas `tokens` [B, L, C] and `mask` [B, L] (1 = unknown), upstream's
        `forward_mae_encoder` then `mar.forward_mae_decoder` on `image_shape`."""
        bsz = tokens.shape[0]
        cond = self._resolve(cond, drop, bsz)
        mar = self.mar
        tokens = tokens.to(mar.fake_latent.dtype)  # upstream's `x.to(self.dtype)` (bfloat16 weights)
        d = mar.config.encoder_embed_dim
        buffer = mar.fake_latent.to(tokens.dtype).unsqueeze(1).expand(bsz, mar.buffer_size, d)
        shape = self._image_shape
        x_enc, valid = mar.forward_mae_encoder(tokens, mask, buffer, image_shape=shape)
        if self.llm_checkpointing and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(self._llm, self.proj_in(x_enc), valid, cond, use_reentrant=False)
        else:
            h = self._llm(self.proj_in(x_enc), valid, cond)
        x_enc = x_enc + self.proj_out(h.to(x_enc.dtype))
        return mar.forward_mae_decoder(x_enc, mask, valid=valid, image_shape=shape)

    # ---------------------------------------------------------------- pretraining
    def pretrain_loss(self, tokens: torch.Tensor, cond: HarmonCondition | None,
                      generator: torch.Generator | None = None, drop_conditions: bool | None = None) -> torch.Tensor:
        """Upstream's `text2image_loss`: MAR's masking and diffusion loss around this policy's z; dropped rows (CFG
        training, `label_drop_prob`) get the unconditional prompt."""
        if drop_conditions is None:
            drop_conditions = self.training
        dev = tokens.device
        mask = self.mar.random_masking(self.sample_orders(tokens.shape[0], generator, dev), generator)
        drop = None
        if drop_conditions and cond is not None:
            drop = torch.rand(len(cond), generator=generator, device=dev) < self.mar.config.label_drop_prob
        z = self(tokens, mask, cond, drop)
        return self.mar.masked_diffusion_loss(tokens, z, mask, generator)
