"""``git_vqa``: the T2I-R1 / MAR-GRPO attribute-binding reward, GIT answering "yes" to each attribute-noun phrase.

Release: AMAP-ML/mar-grpo ``src/grpo/src/utils/reward_git.py`` (identical to CaraJ7/T2I-R1's), with
``microsoft/git-large-vqav2``. Per sample, from its T2I-R1 metadata:

- ``task_type`` ``spatial`` or ``numeracy``: 0 (the release skips them with 0, not with a missing value: the
  Grounding DINO reward scores those prompts, and a constant 0 leaves their group advantages unchanged);
- otherwise one question per ``attr_nouns`` phrase if the record has them, else per ``nouns`` phrase; no phrase
  at all scores 1;
- question ``"{phrase}?"`` (the release asks e.g. "purple elephant?", not "is there a purple elephant?";
  ``question`` changes the template), tokenised without special tokens after GIT's ``[CLS]``; the answer is read
  at the last question token: ``p(yes) / (p(yes) + p(no))`` from the softmax over the vocabulary, with "yes" and
  "no" the tokenizer's ids of those words; the sample's score is the mean over its questions.

GIT reads the image once per question (``GitForCausalLM`` encodes the image inside its forward); questions are
right-padded, which leaves the logits at each question's last token unchanged (the text attention is causal).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from ._hf import load_hf_model, load_hf_processor, model_dir
from .base import Reward, ScoreResult
from .grounding_dino import require_t2i_r1_metadata
from .registry import register_reward

__all__ = ["GitVqaReward", "questions_for"]

SKIPPED_TASKS = ("spatial", "numeracy")


def questions_for(meta: dict[str, Any], nouns: list[str], template: str) -> list[str] | None:
    """The sample's questions, or None where the release gives 0 (spatial and numeracy prompts)."""
    if meta.get("task_type") in SKIPPED_TASKS:
        return None
    attr = meta.get("attr_nouns")
    phrases = list(attr) if attr is not None else nouns
    return [template.format(phrase=p) for p in phrases]


@register_reward("git_vqa")
class GitVqaReward(Reward):
    """GIT VQA yes-probability for each attribute-noun phrase, averaged.

    Args:
        model_path: a transformers GIT folder (``microsoft/git-large-vqav2``: config.json, weights,
            preprocessor_config.json, tokenizer files).
        question: the question template with ``{phrase}`` (release: ``"{phrase}?"``).
    """

    def __init__(self, *, model_path: str | os.PathLike, question: str = "{phrase}?", **kwargs: Any) -> None:
        from transformers import GitForCausalLM

        kwargs.setdefault("batch_size", 8)
        super().__init__(**kwargs)
        if "{phrase}" not in question:
            raise ValueError(f"git_vqa: question must contain '{{phrase}}', got {question!r}")
        self.question = question
        self.path = model_dir(model_path, what="git_vqa", hint="a transformers GIT folder, e.g. "
                              "microsoft/git-large-vqav2 (config.json, weights, preprocessor_config.json, tokenizer)")
        self.model = load_hf_model(GitForCausalLM, self.path, device=self.device, dtype=self.dtype, what="git_vqa")
        self.processor = load_hf_processor(self.path, what="git_vqa")
        tok = self.processor.tokenizer
        self.yes_id, self.no_id = (self._word_id(w) for w in ("yes", "no"))
        if tok.cls_token_id is None or tok.pad_token_id is None:
            raise ValueError(f"git_vqa: the tokenizer at {self.path} has no [CLS] or [PAD] token; not a GIT tokenizer")

    def _word_id(self, word: str) -> int:
        ids = self.processor.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"git_vqa: {word!r} is not one token of the tokenizer at {self.path} (got ids {ids})")
        return int(ids[0])

    def _move(self) -> None:
        self.model.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": str(self.path), "question": self.question}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        tok = self.processor.tokenizer
        scores = torch.zeros(len(images), dtype=torch.float32)
        owner, texts = [], []
        for i, (m, p) in enumerate(zip(metadata, prompts, strict=True)):
            qs = questions_for(m, require_t2i_r1_metadata(m, i, p, self.name), self.question)
            if qs is None:
                continue
            if not qs:
                scores[i] = 1.0
            owner += [i] * len(qs)
            texts += qs
        if texts:
            ids = [[tok.cls_token_id, *tok(q, add_special_tokens=False).input_ids] for q in texts]
            length = torch.tensor([len(x) for x in ids])
            input_ids = torch.full((len(ids), int(length.max())), tok.pad_token_id, dtype=torch.long)
            for r, x in enumerate(ids):
                input_ids[r, : len(x)] = torch.tensor(x)
            users = sorted(set(owner))
            pixels = self.processor(images=[images[i] for i in users], return_tensors="pt").pixel_values
            row = {i: r for r, i in enumerate(users)}
            pixels = pixels[torch.tensor([row[i] for i in owner])].to(self.device, self.dtype)
            logits = self.model(pixel_values=pixels, input_ids=input_ids.to(self.device)).logits
            n_image = logits.shape[1] - input_ids.shape[1]  # GIT puts the image tokens before the text
            last = logits[torch.arange(len(ids), device=logits.device), (n_image + length - 1).to(logits.device)]
            probs = last.float().softmax(-1)
            yes = (probs[:, self.yes_id] / (probs[:, self.yes_id] + probs[:, self.no_id])).cpu()
            sums = torch.zeros(len(images)).index_add_(0, torch.tensor(owner), yes)
            counts = torch.zeros(len(images)).index_add_(0, torch.tensor(owner), torch.ones(len(owner)))
            has = counts > 0
            scores[has] = sums[has] / counts[has]
        cats = [str(m.get("task_type", "unknown")) for m in metadata]
        return scores, {}, cats
