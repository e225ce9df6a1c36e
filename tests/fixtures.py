"""Tiny variants of the library's models for fast tests (same structure, a fraction of the width),
and data files written independently of cnnjax's readers."""

import functools
import io
import tarfile

import numpy as np

from cnnjax.nn.models import MODELS, SeedCNN, register_model
from cnnjax.nn.resnet import ResNet

TinySeedCNN = functools.partial(SeedCNN, features=(4, 8), dense=(16,))
# One block per stage, 8 channels wide, the small-image stem.
TinyResNet = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8, stem="small")


def lion_factory(cfg, learning_rate):
    """An optimizer factory named by import path in tests: optax's Lion with optim.kwargs."""
    import optax

    return optax.lion(learning_rate, **cfg.kwargs)


def register() -> None:
    """Makes `model.name=resnet_tiny` reach TinyResNet, for tests that train through a config."""
    if "resnet_tiny" not in MODELS:
        register_model("resnet_tiny", TinyResNet)


def cifar_records(images, labels) -> bytes:
    """CIFAR binary records written byte by byte as the format's page describes them: the label
    bytes of each image (CIFAR-100: coarse, fine), then its red, green and blue 32x32 planes, each
    row-major."""
    out = bytearray()
    for image, label in zip(images, labels):
        out += bytes(int(v) for v in np.atleast_1d(label))
        for channel in range(3):
            for row in range(32):
                out += bytes(int(v) for v in image[row, :, channel])
    return bytes(out)


def write_cifar_archive(path, members: dict) -> None:
    """A tar.gz holding `members` (name inside the archive -> bytes), as the official archives do."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
