"""Public entry points of the converters for other people's checkpoint formats.

The code lives beside its model family (`margrpo.models.mar.lth14`, `margrpo.models.mar.kl16`); these modules are
the stable import paths users and scripts name (`margrpo.compat.lth14.load_checkpoint(path, ema=True)`).
"""
