"""One MAR-GRPO step of NOVA-0.6B- and Harmon-1.5B-shaped models (random weights) on one GPU: peak memory and speed.

What costs on a GPU is the architecture, not the weights' values, so both models are built from their published
shapes with random weights and nothing is downloaded:

* NOVA-0.6B (`BAAI/nova-d48w1024-sd512`): `vit_d16w1024` video encoder, `vit_d32w1024` image encoder,
  `mlp_d3w1280` flow head, 512 px through an 8-stride 4-channel VAE (1024 tokens of 16 values), Phi-2-sized
  text features (256 x 2560) given directly (the text encoder runs once per prompt, outside the step);
* Harmon-1.5B: a Qwen2.5-1.5B-shaped LLM (28 layers, 1536 wide, 12 query / 2 KV heads) around a MAR-huge-shaped
  encoder / decoder (1280 wide, 20 + 20 layers) with its DDPM head (12 x 1536), 512 px through the 16-stride
  16-channel KL-16 VAE (1024 tokens), a 32-token prompt prefilled into the LLM's KV cache.

The step is MAR-GRPO's: a recorded rollout of G images with K=4 MTE chains (commit source, 30% most uncertain
tokens), then the trajectory loss (consistency filter, KL to a frozen reference) on `--ar-steps-scored` AR steps x 4
head steps, backward and AdamW on the AR transformer (the head frozen). Plain GRPO's step on the same model (no
chains, the committed tokens only) alternates with it, and each MAR-GRPO figure is also given as a ratio to it.
Advantages are random: the reward model is not part of this benchmark. `--tiny` shrinks every width and depth so
the script runs on a CPU in CI (`tests/test_benchmarks.py`).
Run: `python -m benchmarks.bench_gpu --device cuda [--dtype bfloat16]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import PeakMemory, machine, median_spread, write_results
from margrpo.models.base import Policy
from margrpo.models.conditioning import Condition
from margrpo.rl.config import AlgorithmSection
from margrpo.rl.loss import ar_step_loss
from margrpo.sampling.config import RecordPlan, SamplerConfig
from margrpo.sampling.sampler import sample


def nova_policy(tiny: bool) -> tuple[Policy, object]:
    """A NOVA-0.6B-shaped `NOVAPolicy` and a condition factory (random text features)."""
    from margrpo.models.nova.model import NOVAConfig, NOVAPolicy, ViTSpec

    if tiny:
        cfg = NOVAConfig(image_dim=4, image_size=(128, 128), image_stride=8, text_token_dim=16, text_token_len=8,
                         image_base_size=(8, 8), video_base_size=(1, 4, 4), video_encoder=ViTSpec(1, 32, 2),
                         image_encoder=ViTSpec(1, 32, 2), image_decoder=ViTSpec(1, 32))
    else:
        cfg = NOVAConfig(image_dim=4, image_size=(512, 512), image_stride=8, text_token_dim=2560, text_token_len=256,
                         image_base_size=(32, 32), video_base_size=(1, 16, 16), video_encoder=ViTSpec(16, 1024, 16),
                         image_encoder=ViTSpec(32, 1024, 16), image_decoder=ViTSpec(3, 1280))
    policy = NOVAPolicy(cfg)

    def condition(n: int, device: torch.device, g: torch.Generator) -> Condition:
        text = torch.randn(n, cfg.text_token_len, cfg.text_token_dim, generator=g, device=device)
        return Condition(text=text, text_mask=torch.ones(n, cfg.text_token_len, dtype=torch.bool, device=device))

    return policy, condition


def harmon_policy(tiny: bool) -> tuple[Policy, object]:
    """A Harmon-1.5B-shaped `HarmonPolicy` (Qwen2.5-1.5B-shaped LLM + MAR-huge-shaped MAR) and a condition factory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from margrpo.models.harmon.policy import HarmonPolicy
    from margrpo.models.mar.model import MARPolicy

    if tiny:
        llm_cfg = Qwen2Config(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              tie_word_embeddings=True)
        mar_kw = dict(img_size=16, vae_stride=4, patch_size=1, vae_embed_dim=16, encoder_embed_dim=32,
                      encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                      decoder_num_heads=2, buffer_size=4, diffloss_d=1, diffloss_w=32, class_num=10)
    else:
        llm_cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                              tie_word_embeddings=True)
        mar_kw = dict(img_size=512, vae_stride=16, patch_size=1, vae_embed_dim=16, encoder_embed_dim=1280,
                      encoder_depth=20, encoder_num_heads=16, decoder_embed_dim=1280, decoder_depth=20,
                      decoder_num_heads=16, buffer_size=64, diffloss_d=12, diffloss_w=1536, class_num=1000)
    llm = Qwen2ForCausalLM(llm_cfg)
    mar = MARPolicy(**mar_kw, num_sampling_steps="10")
    policy = HarmonPolicy(llm, mar, torch.arange(8))
    prompt_len = 32 if not tiny else 6

    def condition(n: int, device: torch.device, g: torch.Generator):
        ids = torch.randint(0, llm_cfg.vocab_size, (n, prompt_len), generator=g, device=device)
        return policy.prefill(ids, torch.ones(n, prompt_len, dtype=torch.bool, device=device))

    return policy, condition


MODELS = {"NOVA-0.6B": nova_policy, "Harmon-1.5B": harmon_policy}


def grpo_step(policy: Policy, reference: Policy, opt: torch.optim.Optimizer, cond, g_size: int, k: int,
              n_scored: int, device: torch.device, dtype: torch.dtype, seed: int,
              mar: bool = True) -> dict[str, float]:
    """One MAR-GRPO step (`mar`), or plain GRPO's; returns the rollout and update times (seconds)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    cfg = SamplerConfig(ar_steps=8, diffusion_steps=10)
    plan = RecordPlan(policy_tokens="unknown" if mar else "committed", mte_k=k if mar else 0, mte_source="commit",
                      mte_top_fraction=0.3)
    sync()
    t0 = time.perf_counter()
    with autocast:
        r = sample(policy, cond, g_size, cfg, torch.Generator(device).manual_seed(seed),
                   torch.Generator(device).manual_seed(seed + 1), record=plan)
    sync()
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(g_size, generator=gen).to(device)
    use = torch.ones(g_size, dtype=torch.bool, device=device)
    js = [j for j in range(r.head_steps) if policy.head.is_stochastic(j)][:4]
    scored = sorted(r.steps)[-n_scored:]
    obj = AlgorithmSection(mte_k=k if mar else 0, mte_top_fraction=0.3,
                           policy_tokens="consistent" if mar else "committed", beta=0.01)
    opt.zero_grad(set_to_none=True)
    cache: dict = {}
    for i in scored:
        with autocast:
            loss = ar_step_loss(policy, reference, r, i, js, adv, use, obj, cache, first_epoch=True).loss
        (loss / len(scored)).backward()
    opt.step()
    sync()
    return {"rollout_s": t1 - t0, "update_s": time.perf_counter() - t1}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--group", type=int, default=8, help="G: images per step (one prompt)")
    ap.add_argument("--mte-k", type=int, default=4)
    ap.add_argument("--ar-steps-scored", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--tiny", action="store_true", help="CI size: every width and depth shrunk, runs on a CPU")
    ap.add_argument("--name", default=None, help="results file stem (default gpu_<device>_<dtype>[_tiny])")
    args, _ = ap.parse_known_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    rows = []
    for name in args.models:
        torch.manual_seed(0)  # only the module initialisers (random weights by design)
        policy, condition = MODELS[name](args.tiny)
        policy = policy.to(device).eval()
        reference = MODELS[name](args.tiny)[0].to(device).eval()
        reference.load_state_dict(policy.state_dict())
        for p in reference.parameters():
            p.requires_grad_(False)
        for m in (policy, reference):  # the rollout's head step count (the replay checks it)
            m.head.set_sampling_steps(10)
        head_ids = {id(p) for p in policy.head.parameters()}
        train = [p for n, p in policy.named_parameters()
                 if id(p) not in head_ids and not n.startswith(("llm.", "proj_in.", "proj_out."))]
        for p in policy.head.parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW(train, lr=1e-6)
        cond = condition(args.group, device, torch.Generator(device).manual_seed(0))
        peak = PeakMemory(device)
        times: dict[bool, list[dict]] = {True: [], False: []}
        peaks: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(args.repeats + 1):
            for mar in (False, True):  # GRPO and MAR-GRPO alternate: each ratio pairs two steps seconds apart
                with peak.measure():
                    t = grpo_step(policy, reference, opt, cond, args.group, args.mte_k, args.ar_steps_scored,
                                  device, dtype, seed=rep, mar=mar)
                if rep:  # the first step warms kernels and allocators up
                    times[mar].append(t)
                    peaks[mar].append(peak.peak_bytes / 2**30)

        def total(t: dict) -> float:
            return t["rollout_s"] + t["update_s"]

        for mar in (True, False):
            step, step_iqr = median_spread([total(t) for t in times[mar]])
            roll, roll_iqr = median_spread([t["rollout_s"] for t in times[mar]])
            mem, mem_iqr = median_spread(peaks[mar])
            pairs = list(zip(times[mar], times[False], strict=True))
            rows.append({"model": name, "method": "mar-grpo" if mar else "grpo",
                         "params M": sum(p.numel() for p in policy.parameters()) / 1e6,
                         "G": args.group, "K": args.mte_k if mar else 0,
                         "s/step": step, "s/step IQR": step_iqr,
                         "time vs grpo": median_spread([total(a) / total(b) for a, b in pairs])[0],
                         "rollout images/s": args.group / roll, "rollout s IQR": roll_iqr,
                         "update s": median_spread([t["update_s"] for t in times[mar]])[0],
                         "peak GB": mem, "peak GB IQR": mem_iqr,
                         "memory vs grpo": median_spread([a / b for a, b in zip(peaks[mar], peaks[False], strict=True)
                                                          if b > 0] or [float("nan")])[0],
                         "repeats": args.repeats})
        del policy, reference, opt, cond
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stem = args.name or f"gpu_{args.device.replace(':', '')}_{args.dtype}{'_tiny' if args.tiny else ''}"
    md = write_results(stem, rows, ["model", "method", "params M", "G", "K", "s/step", "s/step IQR",
                                    "time vs grpo", "rollout images/s", "rollout s IQR", "update s", "peak GB",
                                    "peak GB IQR", "memory vs grpo", "repeats"],
                       {**machine(), "device": args.device, "dtype": args.dtype, "tiny": args.tiny,
                        "memory": PeakMemory(device).method})
    print(md.read_text())


if __name__ == "__main__":
    main()
