"""Harmon's condition: the templated prompt's token ids, its padding mask and the LLM's KV cache over it.

Harmon conditions the MAR on a Qwen2.5 LLM that reads the prompt and then the image tokens. Upstream prefills the
prompt once per generation and reuses its KV cache at every AR step, trimming the image tokens off after each call
(`curtail_cache`). `HarmonCondition` carries that cache through the shared sampler and the rollout: it batches
like `models.conditioning.Condition` (`len`, `cat`, `repeat_interleave`, `index`, `detach`, `to`), and every
batching op builds a new cache from the per-layer tensors, so two conditions never share one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported only when a Harmon model is used (`load_model` checks folders cheaply)
    from transformers import DynamicCache

__all__ = ["HarmonCondition", "cache_tensors", "make_cache", "trim_cache"]


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of every layer, each [B, heads, T, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A `DynamicCache` holding these per-layer tensors (transformers >= 4.56 takes them at construction)."""
    from transformers import DynamicCache

    return DynamicCache([(k, v) for k, v in kv])


def trim_cache(cache: DynamicCache, length: int) -> None:
    """Cut the cache back to its first `length` positions (upstream's `curtail_cache`), with the cache's own `crop`.

    Why the copy: `crop` keeps a view of the concatenated [prompt; image] keys, which would pin the image part in
    memory and, with gradients on, tie the prompt cache to this call's autograd graph (a later backward through it
    would fail once that graph is freed). A detached copy of the prompt part holds the same values and nothing else.
    """
    extra = cache.get_seq_length() - length
    if extra <= 0:
        return
    cache.crop(-extra)  # negative = tokens to remove (transformers 5; 4.5x reads it the same way)
    for layer in cache.layers:
        layer.keys = layer.keys.detach().clone()
        layer.values = layer.values.detach().clone()


@dataclass
class HarmonCondition:
    """A batch of Harmon prompts: `input_ids` [B, T], `attention_mask` [B, T] (bool, True on real tokens, right
    padded) and `past_key_values`, the LLM's cache over all T positions (positions 0..T-1, no attention mask, as
    upstream's prefill). Padding keys are masked when the image tokens attend to the prompt, so their values (and
    the pad id) do not matter.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    past_key_values: DynamicCache

    def __post_init__(self) -> None:
        self.attention_mask = self.attention_mask.bool()
        if self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                             f"{tuple(self.attention_mask.shape)} differ in shape")
        t = self.past_key_values.get_seq_length()
        if t != self.prompt_length:
            raise ValueError(f"the prompt cache holds {t} positions, the prompts have {self.prompt_length}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        """T, the padded prompt length: the cache is trimmed back to it after every policy call."""
        return int(self.input_ids.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        """[B] real prompt tokens per row: the first image token's position id."""
        return self.attention_mask.sum(1)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> HarmonCondition:
        kv = [(fn(k), fn(v)) for k, v in cache_tensors(self.past_key_values)]
        return HarmonCondition(fn(self.input_ids), fn(self.attention_mask), make_cache(kv))

    def repeat_interleave(self, n: int) -> HarmonCondition:
        """Each condition n times in a row (B prompts x G images)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def index(self, idx: torch.Tensor | slice) -> HarmonCondition:
        return self._map(lambda t: t[idx])

    def detach(self) -> HarmonCondition:
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> HarmonCondition:
        return self._map(lambda t: t.to(device))

    def padded(self, length: int) -> HarmonCondition:
        """The same prompts padded to `length` positions (masked pad keys: the same condition)."""
        t = self.prompt_length
        if length == t:
            return self
        if length < t:
            raise ValueError(f"cannot pad a condition of {t} positions to {length}")

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[dim] = length - t
            return torch.cat([x, x.new_zeros(shape)], dim=dim)

        kv = [(pad(k, -2), pad(v, -2)) for k, v in cache_tensors(self.past_key_values)]
        return HarmonCondition(pad(self.input_ids, 1), pad(self.attention_mask, 1), make_cache(kv))

    @staticmethod
    def cat(conds: list[HarmonCondition]) -> HarmonCondition:
        """Rows of several conditions in one batch, padded to the longest prompt."""
        t = max(c.prompt_length for c in conds)
        conds = [c.padded(t) for c in conds]
        layers = zip(*(cache_tensors(c.past_key_values) for c in conds), strict=True)
        kv = [(torch.cat([k for k, _ in per], 0), torch.cat([v for _, v in per], 0)) for per in layers]
        return HarmonCondition(torch.cat([c.input_ids for c in conds]), torch.cat([c.attention_mask for c in conds]),
                               make_cache(kv))

    def where(self, rows: torch.Tensor, other: HarmonCondition) -> HarmonCondition:
        """Row b from `other` where `rows[b]`, else from self (the unconditional prompt for dropped rows)."""
        t = max(self.prompt_length, other.prompt_length)
        a, b = self.padded(t), other.padded(t)
        r = rows.to(a.input_ids.device).bool()

        def sel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.where(r.view(-1, *([1] * (x.dim() - 1))), y, x)

        kv = [(sel(ka, kb), sel(va, vb)) for (ka, va), (kb, vb) in
              zip(cache_tensors(a.past_key_values), cache_tensors(b.past_key_values), strict=True)]
        return HarmonCondition(sel(a.input_ids, b.input_ids), sel(a.attention_mask, b.attention_mask),
                               make_cache(kv))
