"""Tiny variants of the library's models for fast tests: same structure, a fraction of the width."""

import functools

from cnnjax.nn.models import MODELS, SeedCNN
from cnnjax.nn.resnet import RESNETS, ResNet

TinySeedCNN = functools.partial(SeedCNN, features=(4, 8), dense=(16,))
# One block per stage, 8 channels wide, the small-image stem.
TinyResNet = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8, stem="small")


def register() -> None:
    """Makes `model.name=resnet_tiny` reach TinyResNet, for tests that train through a config."""
    RESNETS.setdefault("resnet_tiny", (TinyResNet, 8))
    MODELS.setdefault("resnet_tiny", TinyResNet)
