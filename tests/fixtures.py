"""Tiny variants of the library's models for fast tests (same structure, a fraction of the width),
and data files written independently of cnnjax's readers."""

import contextlib
import functools
import io
import os
import pathlib
import shutil
import socket
import subprocess
import tarfile
import tempfile

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


@contextlib.contextmanager
def postgres_server():
    """A real PostgreSQL server of its own, on a Unix socket in a fresh directory (no TCP), as
    pytest-postgresql's factories start one; yields its URL for user `cnnjax`, database
    `postgres`. initdb refuses to run as root: then the server runs as the `postgres` user."""
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        raise RuntimeError("initdb and pg_ctl are not on PATH: install PostgreSQL's server "
                           "binaries (Debian: postgresql) to run this test.")
    base = pathlib.Path(tempfile.mkdtemp(prefix="cnnjax-pg-"))
    data = base / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chmod(base, 0o755)
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:  # a free port number names the socket file
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, "initdb", "-D", str(data), "-A", "trust", "-U", "cnnjax"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-w", "-o",
                    f"-p {port} -k {base} -c listen_addresses=''", "-l", str(base / "log"),
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://cnnjax@/postgres?host={base}&port={port}"
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
