"""Tiny random models written in their published folder layout with the real classes' ``save_pretrained``.

No weights can be downloaded here: each builder makes a model of the real transformers class with a few
thousand parameters, saves it, its image processor and its tokenizer (built offline from a hand-written vocabulary)
into one folder, exactly as the hub folders the rewards read (``config.json``, ``model.safetensors``,
``preprocessor_config.json``, tokenizer files).
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import torch

#: Word pieces of the tiny BERT tokenizers (Grounding DINO's text encoder and GIT use bert-base-uncased's scheme).
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", *string.ascii_lowercase, "red", "car", "zebra",
              "cat", "dog", "yes", "no", "teddy", "bear", "purple", "elephant", "blue", "bus", "wine", "glass",
              "cup", "apple", "circle", "square"]


def bert_tokenizer(folder: Path):
    """A BertTokenizer over :data:`BERT_WORDS` (ids in that order), not yet saved anywhere else."""
    import transformers

    raw = folder / "bert-raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return transformers.BertTokenizer.from_pretrained(str(raw), local_files_only=True)


def clip_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer with 64 ids (letters, letters</w>, digits, sot=62, eot=63) saved at ``folder/tok``."""
    import transformers

    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({str(i): 52 + i for i in range(10)})
    vocab.update({"<|startoftext|>": 62, "<|endoftext|>": 63})
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer.from_pretrained(str(raw), local_files_only=True)
    tok.save_pretrained(folder / "tok")
    return folder / "tok"


def tiny_clip(folder: Path, tokenizer_dir: Path) -> Path:
    """A transformers CLIP folder (model + tokenizer + preprocessor_config.json), 32 px images."""
    import transformers

    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=62, eos_token_id=63,
                         pad_token_id=63, hidden_act="gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "resample": 3, "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


def tiny_grounding_dino(folder: Path) -> Path:
    """``GroundingDinoForObjectDetection`` (Swin backbone, BERT text encoder) + its processor files, 128 px images."""
    import transformers

    tok = bert_tokenizer(folder)
    cfg = transformers.GroundingDinoConfig(
        backbone_config=transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                                num_heads=[1, 1, 1, 1], window_size=2,
                                                out_features=["stage2", "stage3", "stage4"]),
        text_config=transformers.BertConfig(vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
        num_queries=20, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32)
    torch.manual_seed(0)
    transformers.GroundingDinoForObjectDetection(cfg).save_pretrained(folder)
    transformers.GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_owlv2(folder: Path) -> Path:
    """``Owlv2ForObjectDetection`` + its processor files (CLIP tokenizer), 32 px images."""
    import transformers

    tok_dir = clip_tokenizer(folder / "cliptok")
    cfg = transformers.Owlv2Config(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=62, eos_token_id=63,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    transformers.Owlv2ForObjectDetection(cfg).save_pretrained(folder)
    transformers.Owlv2ImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    # OWLv2's processor pads every query to the tokenizer's model_max_length (16 in google/owlv2-*)
    transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True, model_max_length=16
                                               ).save_pretrained(folder)
    return folder


def tiny_git(folder: Path) -> Path:
    """``GitForCausalLM`` (CLIP vision tower) + CLIP image processor + BERT tokenizer, 32 px images."""
    import transformers

    tok = bert_tokenizer(folder)
    cfg = transformers.GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.GitForCausalLM(cfg).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def openclip_shapes(vocab: int = 64, ctx: int = 16, tw: int = 64, vw: int = 40, patch: int = 8, grid: int = 4,
                    embed: int = 16, layers: int = 2) -> dict[str, list[int]]:
    """Key -> shape of open_clip's standard CLIP state dict (its on-disk format)."""
    s: dict[str, list[int]] = {"ln_final.bias": [tw], "ln_final.weight": [tw], "logit_scale": [],
                               "positional_embedding": [ctx, tw], "text_projection": [tw, embed],
                               "token_embedding.weight": [vocab, tw], "visual.class_embedding": [vw],
                               "visual.conv1.weight": [vw, 3, patch, patch], "visual.ln_post.bias": [vw],
                               "visual.ln_post.weight": [vw], "visual.ln_pre.bias": [vw], "visual.ln_pre.weight": [vw],
                               "visual.positional_embedding": [grid * grid + 1, vw], "visual.proj": [vw, embed]}
    for prefix, w in (("transformer.resblocks", tw), ("visual.transformer.resblocks", vw)):
        for i in range(layers):
            p = f"{prefix}.{i}"
            s.update({f"{p}.attn.in_proj_bias": [3 * w], f"{p}.attn.in_proj_weight": [3 * w, w],
                      f"{p}.attn.out_proj.bias": [w], f"{p}.attn.out_proj.weight": [w, w],
                      f"{p}.ln_1.bias": [w], f"{p}.ln_1.weight": [w], f"{p}.ln_2.bias": [w], f"{p}.ln_2.weight": [w],
                      f"{p}.mlp.c_fc.bias": [4 * w], f"{p}.mlp.c_fc.weight": [4 * w, w],
                      f"{p}.mlp.c_proj.bias": [w], f"{p}.mlp.c_proj.weight": [w, 4 * w]})
    return s


def openclip_state_dict(**kw) -> dict[str, torch.Tensor]:
    """A tiny open_clip CLIP state dict (HPS v2's release format wraps it in {"state_dict": ...}): randn * 0.2 over
    the sorted keys from seed 0, logit_scale log(1 / 0.07). test_rewards_models' golden features were computed by
    the real open_clip on exactly these weights."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.2 for k, shape in sorted(openclip_shapes(**kw).items())}
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return sd


#: Qwen2-VL's chat template, reduced to what one user turn with an image and text needs (the real one also adds
#: a default system turn; the reward passes whatever template the base folder has).
QWEN2_VL_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_hpsv3(folder: Path, *, old_layout: bool = False):
    """HPSv3's release format: a Qwen2-VL base folder (config, byte-level tokenizer with chat template, image
    processor for 56 x 56 images) and ``HPSv3.safetensors``, the state dict of Qwen2-VL with its embeddings resized
    for ``<|Reward|>`` plus the ranknet ``rm_head``. Returns (base folder, checkpoint, model, head) for hand checks.
    ``old_layout``: keys as transformers before 4.52 saved them (``visual.*``, ``model.layers.*``)."""
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    for s in specials:
        vocab[s] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = transformers.Qwen2Tokenizer(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      additional_special_tokens=specials[1:])
    tok.chat_template = QWEN2_VL_CHAT
    tok.save_pretrained(base)
    transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=4 * 56 * 56).save_pretrained(base)
    ids = tok.convert_tokens_to_ids
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                        "rope_theta": 10000.0},
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    kw = dict(vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14,
                                 spatial_merge_size=2, temporal_patch_size=2),
              image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
              vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    transformers.Qwen2VLConfig(text_config={**text, "vocab_size": len(tok)}, **kw).save_pretrained(base)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(
        transformers.Qwen2VLConfig(text_config={**text, "vocab_size": len(tok) + 1}, **kw)).eval()
    head = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Dropout(0.05), torch.nn.Linear(8, 4),
                               torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if old_layout:
        sd = {("visual." + k[len("model.visual."):] if k.startswith("model.visual.") else
               "model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
              for k, v in sd.items()}
    sd.update({f"rm_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    ckpt = folder / "HPSv3.safetensors"
    save_file(sd, str(ckpt))
    return base, ckpt, model, head
