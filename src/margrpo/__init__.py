"""margrpo: GRPO fine-tuning of masked autoregressive image generators with per-token diffusion heads."""

__version__ = "0.1.0"
