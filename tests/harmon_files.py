"""A tiny random Harmon written in upstream's on-disk formats: `harmon.pth` (flat `{key: tensor}` with `llm.*`,
`mar.*`, `proj_in.*`, `proj_out.*`; no `vae.*`, no `llm.lm_head.weight`), an LLM folder with only `config.json` and
a tokenizer, and `kl16.ckpt` (`{"model": state_dict}`).

The tensors come from independently built modules (transformers' `Qwen2ForCausalLM`, LTH14-named `MAR`, plain
`nn.Sequential` projectors, `AutoencoderKL`), not from the Harmon classes under test.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from torch import nn

# a 4x4 token grid (16 px at the tiny VAE's stride 4), two heads everywhere
MAR_KW = dict(img_size=16, vae_stride=4, patch_size=1, vae_embed_dim=16, encoder_embed_dim=32, encoder_depth=1,
              encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=4,
              diffloss_d=1, diffloss_w=32, class_num=10, num_sampling_steps="6")
# what a .pth cannot say: head counts (shapes do not fix them) and the head's step count
LOAD_KW = dict(encoder_num_heads=2, decoder_num_heads=2, num_sampling_steps="6")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """Byte-level BPE without merges (one token per byte) that knows Qwen's chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS)


def tiny_llm_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)


def _perturb(module: nn.Module, seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Initial weights plus noise (zero-initialised head layers would hide z's effect; norms stay near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def tiny_vae():
    from margrpo.models.vae import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(embed_dim=16, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1, resolution=16,
                         encoder_attn_resolutions=(4,), decoder_attn_resolutions=()).eval()


def write_tiny_harmon(root: Path, with_vae_keys: bool = False) -> dict[str, Path]:
    """Write the three files under `root`; returns {"pth", "llm", "vae"}."""
    from transformers import Qwen2ForCausalLM

    from margrpo.models.mar.model import MARPolicy

    root.mkdir(parents=True, exist_ok=True)
    llm_dir = root / "Qwen2.5-tiny-Instruct"
    cfg = tiny_llm_config()
    cfg.save_pretrained(str(llm_dir))  # config.json only: the weights live in the .pth
    tiny_tokenizer().save_pretrained(str(llm_dir))
    torch.manual_seed(1)
    llm = Qwen2ForCausalLM(cfg)
    mar = MARPolicy(**MAR_KW)
    proj_in = nn.Sequential(nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 32))
    proj_out = nn.Sequential(nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 32))
    sd: dict[str, torch.Tensor] = {}
    for prefix, module, seed in (("llm.", llm, 2), ("mar.", mar, 3), ("proj_in.", proj_in, 4),
                                 ("proj_out.", proj_out, 5)):
        sd.update({prefix + k: v for k, v in _perturb(module, seed).items()})
    del sd["llm.lm_head.weight"]  # tied to the embedding; upstream's files may omit it
    vae = tiny_vae()
    vae_sd = _perturb(vae, 6, std=0.01)
    if with_vae_keys:
        sd.update({"vae." + k: v for k, v in vae_sd.items()})
    torch.save(sd, root / "harmon.pth")
    torch.save({"model": {k: v.half() for k, v in vae_sd.items()}}, root / "kl16.ckpt")  # fp16, as released
    return {"pth": root / "harmon.pth", "llm": llm_dir, "vae": root / "kl16.ckpt"}


@functools.lru_cache(maxsize=1)
def shared_files() -> dict[str, Path]:
    """One set of files per test process (the family builders load them many times)."""
    return write_tiny_harmon(Path(tempfile.mkdtemp(prefix="tiny-harmon-")))


def load_tiny_harmon():
    from margrpo.compat import harmon

    f = shared_files()
    return harmon.load(f["pth"], llm=f["llm"], vae=f["vae"], **LOAD_KW)
