"""LTH14/mar checkpoints (`checkpoint-last.pth`): the public entry point of `margrpo.models.mar.lth14`."""

from margrpo.models.mar.lth14 import *  # noqa: F403
from margrpo.models.mar.lth14 import __all__  # noqa: F401
