"""LTH14/mar's KL-16 autoencoder (`kl16.ckpt`): the public entry point of `margrpo.models.mar.kl16`."""

from margrpo.models.mar.kl16 import *  # noqa: F403
from margrpo.models.mar.kl16 import __all__  # noqa: F401
