"""``hpsv3``: HPSv3 (MizzenAI/HPSv3), a Qwen2-VL-7B-Instruct with a reward head, on transformers' Qwen2-VL classes.

Release format (the ``hpsv3`` 1.0.0 package, ``hpsv3/inference.py``, ``model/qwen2vl_trainer.py``,
``dataset/data_collator_qwen.py``, ``config/HPSv3_7B.yaml``): ``HPSv3.safetensors`` is the state dict of the whole
``Qwen2VLRewardModelBT``, i.e. ``Qwen2VLForConditionalGeneration`` plus ``rm_head`` =
``Linear(H, 1024) ReLU Dropout Linear(1024, 16) ReLU Linear(16, 2)``, trained with the tokenizer of
``Qwen/Qwen2-VL-7B-Instruct`` extended by the special token ``<|Reward|>`` (embedding rows resized to the
tokenizer's new length). The config, tokenizer, chat template and image processor are read from a local copy of
``Qwen/Qwen2-VL-7B-Instruct`` (``base_model_path``; its weights are not read).

Scoring, as ``HPSv3RewardInferencer.reward``:

1. the image is resized (PIL bicubic) to HPSv3's ``smart_resize`` with ``min_pixels = max_pixels = 256 * 28 * 28``:
   aspect kept, both sides multiples of 28, about 200,704 pixels;
2. one user turn, the image then ``INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN``, through the
   chat template with the generation prompt;
3. the last hidden state at the ``<|Reward|>`` token goes through ``rm_head`` in float32: ``(mu, sigma)``; the score is
   ``mu`` (HPSv3's README: "we select miu as the final output").

Why not transformers' ``Qwen2VLProcessor``: it requires a video processor, and transformers' Qwen2-VL video processor
needs torchvision, which does not load beside a CPU-only torch from PyPI (see the project's dependency notes). The
processor's image part is its image processor (used here) and one text step, done here as it does it: each
``<|image_pad|>`` becomes ``grid_t * grid_h * grid_w / merge_size**2`` copies.

The checkpoint's keys follow the transformers version that saved it: ``model.visual.*`` / ``model.language_model.*``
(4.52 on) or ``visual.*`` / ``model.*`` (before); both are read. ``lm_head`` is not needed and not loaded.
The release's own wrapper (AMAP-ML/mar-grpo ``src/grpo/src/utils/reward_hps_v3.py``) divides ``mu`` by 5 but cannot
run as released (it reads ``self.model``, which it never sets, and calls ``.item()`` on the two outputs); no entry
point of the release uses it. ``scale`` reproduces its intended ``/ 5`` (``scale: 0.2``).
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ._hf import model_dir
from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["HPSv3", "INSTRUCTION", "PROMPT_WITH_SPECIAL_TOKEN", "REWARD_TOKEN", "smart_resize"]

REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
PIXELS = 256 * 28 * 28
FACTOR = 28

INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: E501, W291 - HPSv3's text byte for byte (trailing spaces included): the model was trained on it

PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS) -> tuple[int, int]:
    """HPSv3's (qwen-vl-utils') target size: sides multiples of ``factor``, area within the bounds, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"hpsv3: aspect ratio must be below 200, got {height} x {width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _reward_head(sd: dict[str, torch.Tensor], source: str) -> nn.Sequential:
    """HPSv3's ``ranknet`` head (its default without ``rm_head_kwargs``) from the ``rm_head.*`` tensors."""
    want = {f"{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias")}
    if set(sd) != want:
        raise ValueError(f"hpsv3: {source} rm_head keys {sorted(sd)} are not HPSv3's ranknet head {sorted(want)}")
    h, mid = sd["0.weight"].shape[1], sd["0.weight"].shape[0]
    head = nn.Sequential(nn.Linear(h, mid), nn.ReLU(), nn.Dropout(0.05), nn.Linear(mid, sd["3.weight"].shape[0]),
                         nn.ReLU(), nn.Linear(sd["5.weight"].shape[1], sd["5.weight"].shape[0]))
    head.load_state_dict(sd)
    return head.float().eval().requires_grad_(False)


def _backbone_key(key: str) -> str | None:
    """Checkpoint key -> ``Qwen2VLModel`` key (both transformers layouts); None for keys it does not hold."""
    if key.startswith("lm_head."):
        return None
    for old, new in (("model.visual.", "visual."), ("model.language_model.", "language_model."),
                     ("visual.", "visual."), ("model.", "language_model.")):
        if key.startswith(old):
            return new + key[len(old):]
    raise ValueError(f"hpsv3: unexpected checkpoint key {key!r} (expected model.*, visual.*, lm_head.*, rm_head.*)")


@register_reward("hpsv3")
class HPSv3(Reward):
    """HPSv3 preference score (``mu``).

    Args:
        checkpoint: ``HPSv3.safetensors`` (Hugging Face repo ``MizzenAI/HPSv3``).
        base_model_path: local copy of ``Qwen/Qwen2-VL-7B-Instruct``'s config, tokenizer, chat template and
            ``preprocessor_config.json`` (its weights are not needed).
        scale: multiplies the score (the release's wrapper meant ``mu / 5``: ``scale: 0.2``).
    """

    def __init__(self, *, checkpoint: str | os.PathLike, base_model_path: str | os.PathLike, scale: float = 1.0,
                 pixels: int = PIXELS, **kwargs: Any) -> None:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2VLModel
        from transformers.initialization import no_init_weights

        kwargs.setdefault("batch_size", 4)
        super().__init__(**kwargs)
        self.scale, self.pixels = float(scale), int(pixels)
        base = model_dir(base_model_path, what="hpsv3", hint="a local copy of Qwen/Qwen2-VL-7B-Instruct (config.json, "
                         "tokenizer files, preprocessor_config.json, chat template)")
        ckpt = Path(checkpoint).expanduser()
        if ckpt.suffix != ".safetensors" or not ckpt.is_file():
            raise FileNotFoundError(f"hpsv3: checkpoint {ckpt} is not a .safetensors file (HPSv3.safetensors)")
        self.source = str(ckpt)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        self.tokenizer.add_tokens([REWARD_TOKEN], special_tokens=True)
        self.reward_id = int(self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        self.template = self._chat_template(base)
        self.image_processor = AutoImageProcessor.from_pretrained(str(base), local_files_only=True)
        sd = load_file(str(ckpt))
        head = {k[len("rm_head."):]: v for k, v in sd.items() if k.startswith("rm_head.")}
        backbone = {nk: v for k, v in sd.items() if not k.startswith("rm_head.") and (nk := _backbone_key(k))}
        del sd
        rows = backbone.get("language_model.embed_tokens.weight")
        if rows is None or rows.shape[0] != len(self.tokenizer):
            raise ValueError(f"hpsv3: {ckpt} has {None if rows is None else rows.shape[0]} token embeddings but the "
                             f"tokenizer at {base} has {len(self.tokenizer)} tokens with {REWARD_TOKEN}: not the "
                             "checkpoint of this base model")
        config = AutoConfig.from_pretrained(str(base), local_files_only=True)
        config.text_config.vocab_size = int(rows.shape[0])
        with no_init_weights(), torch.device(self.device):
            model = Qwen2VLModel._from_config(config, dtype=self.dtype)
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        if missing or unexpected:
            raise ValueError(f"hpsv3: {ckpt} does not fit Qwen2VLModel of {base}: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")
        self.model = model.eval().requires_grad_(False)
        # transformers 5 reads the modality ids for its M-RoPE positions; 4.x derives them and takes no such input
        self._takes_modality = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        self.head = _reward_head(head, str(ckpt)).to(self.device)

    @staticmethod
    def _chat_template(base: Path) -> str:
        """The chat template: the tokenizer's, or the processor's ``chat_template.json`` / ``.jinja`` file."""
        import json

        for name in ("chat_template.jinja", "chat_template.json"):
            f = base / name
            if f.is_file():
                text = f.read_text()
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        cfg = base / "tokenizer_config.json"
        tpl = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
        if not isinstance(tpl, str):
            raise FileNotFoundError(f"hpsv3: no chat template in {base} (chat_template.json, chat_template.jinja or "
                                    "tokenizer_config.json's chat_template)")
        return tpl

    def _move(self) -> None:
        self.model.to(self.device)
        self.head.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": self.source, "scale": self.scale}

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids (image placeholders expanded, right-padded), attention mask, pixel values and grids."""
        resized = [im.convert("RGB").resize(tuple(reversed(smart_resize(im.height, im.width, FACTOR, self.pixels,
                                                                           self.pixels))), Image.BICUBIC)
                   for im in images]
        vis = self.image_processor(images=resized, return_tensors="pt")
        merge = int(self.image_processor.merge_size)
        texts = []
        for p, grid in zip(prompts, vis["image_grid_thw"], strict=True):
            question = INSTRUCTION.format(text_prompt=p) + PROMPT_WITH_SPECIAL_TOKEN
            msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.tokenizer.apply_chat_template(msg, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
            if text.count(IMAGE_PAD) != 1:
                raise ValueError(f"hpsv3: the chat template gave {text.count(IMAGE_PAD)} {IMAGE_PAD} for one image")
            texts.append(text.replace(IMAGE_PAD, IMAGE_PAD * (int(grid.prod()) // merge**2)))
        enc = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        # the processor's per-token modality ids (0 text, 1 image), which the model's M-RoPE positions read
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "mm_token_type_ids": (enc["input_ids"] == image_id).long(),
                "pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        batch = self.inputs(images, prompts)
        ids = batch["input_ids"]
        where = (ids == self.reward_id).nonzero()
        if where.shape[0] != ids.shape[0] or not torch.equal(where[:, 0], torch.arange(ids.shape[0])):
            raise ValueError(f"hpsv3: expected one {REWARD_TOKEN} token per prompt; a prompt containing that text "
                             "cannot be scored")
        if not self._takes_modality:
            batch.pop("mm_token_type_ids")
        out = self.model(**{k: v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device)
                            for k, v in batch.items()})
        hidden = out.last_hidden_state[where[:, 0].to(self.device), where[:, 1].to(self.device)]
        mu_sigma = self.head(hidden.float())
        return (self.scale * mu_sigma[:, 0]).float(), {"sigma": mu_sigma[:, 1].float()}

