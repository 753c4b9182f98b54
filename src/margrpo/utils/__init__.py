"""Infrastructure shared by every command: configs, checkpoints, metrics, images, plots, RNG."""
