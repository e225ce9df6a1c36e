"""Loading a finished run from its directory: config, best parameters, and a ready-made predictor."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.training import builder, checkpoint, rundir
from cnnjax.data import datasets, input_pipeline
from cnnjax.config import Config
from cnnjax.data.input_pipeline import as_nhwc
from cnnjax.data.pixels import normalize
from cnnjax.training.parallel import DataParallel
from cnnjax.training.steps import inference_state


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model with its run's normalization; `logits`/`predict` take raw uint8 pixels."""

    run_dir: pathlib.Path
    config: Config
    parts: builder.RunParts
    variables: dict[str, Any]

    @property
    def spec(self) -> datasets.DatasetSpec:
        return self.parts.spec

    @property
    def model(self) -> nn.Module:
        return self.parts.model

    def __post_init__(self):
        spec, model = self.spec, self.model

        @jax.jit
        def _logits(variables, images):
            return model.apply(variables, normalize(images, spec.mean, spec.std), train=False)

        object.__setattr__(self, "_logits", _logits)

    @property
    def summary(self) -> dict[str, Any]:
        return rundir.read_summary(self.run_dir)

    def logits(self, images) -> np.ndarray:
        """Images (N, H, W) or (N, H, W, C) of the run's shape, uint8 or floats in [0, 1] ->
        float32 (N, num_classes); N may be 0."""
        images = as_nhwc(images, self.spec.image_shape)
        if not len(images):  # nothing to shard or compile for
            return np.zeros((0, self.spec.num_classes), np.float32)
        return np.asarray(self._logits(self.variables, jnp.asarray(images)))

    def predict(self, images) -> np.ndarray:
        """uint8 images -> int class indices (N,)."""
        return self.logits(images).argmax(-1)

    def evaluate(self, images=None, labels=None, *, split: str = "test", dataset: str | None = None,
                 batch_size: int = 1000, data_dir: str | None = None,
                 manual_dir: str | None = None) -> dict[str, Any]:
        """Loss, accuracy, count and confusion matrix of the run's parameters, on raw `images`
        and `labels` (in the run's class numbering) or, without them, on `split` of the run's
        dataset (or of `dataset`, of the same image shape); a run trained on a class subset
        (`data.classes`) is scored on those classes, relabelled as in training."""
        if images is None:
            own = self.config.data
            cfg = dataclasses.replace(own, dataset=dataset or own.dataset,
                                      data_dir=data_dir or own.data_dir,
                                      manual_dir=manual_dir or own.manual_dir)
            spec = input_pipeline.dataset_spec(cfg)
            if spec.image_shape != self.spec.image_shape:
                raise ValueError(f"dataset {cfg.dataset!r} has {spec.image_shape} images; the run's "
                                 f"model takes {self.spec.image_shape}.")
            images, labels = input_pipeline.load_split(cfg, split)
            images, labels = input_pipeline.select_classes(images, labels,
                                                           tuple(self.config.data.classes))
        elif labels is None or len(labels) != len(images):
            raise ValueError(f"Run.evaluate takes images with one label each, got "
                             f"{len(images)} images and {None if labels is None else len(labels)} labels.")
        labels = np.asarray(labels, np.int32)
        if len(labels) == 0:
            raise ValueError("Run.evaluate needs at least one image.")
        if labels.min() < 0 or labels.max() >= self.spec.num_classes:
            raise ValueError(f"labels must lie in 0..{self.spec.num_classes - 1} (the run's "
                             f"classes), got {labels.min()}..{labels.max()}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        images = as_nhwc(images, self.spec.image_shape)
        return self.parts.evaluate(inference_state(self.variables), input_pipeline.eval_batches(
            images, labels, min(batch_size, len(labels))))


def load_config(run_dir: pathlib.Path | str) -> Config:
    return rundir.read_config(pathlib.Path(run_dir))


def load_run(run_dir: pathlib.Path | str, step: int | None = None) -> Run:
    """Rebuilds the run's parts from its config.json and restores its best checkpoint (or `step`;
    an unfinished run's best so far, or its latest)."""
    run_dir = pathlib.Path(run_dir)
    cfg = load_config(run_dir)
    saved = rundir.read_data_spec(run_dir)  # None for runs older than data_spec.json
    spec = saved[0] if saved else input_pipeline.data_spec(cfg.data)
    # the optimizer's structure only: its state is restored, never stepped
    parts = builder.build(cfg, spec, saved[1] if saved else 1,
                          sharding=DataParallel.create().replicated)
    step = rundir.best_step(run_dir) if step is None else step
    ckpt = checkpoint.Checkpointer(run_dir, read_only=True)
    state, _, _ = ckpt.restore(parts.abstract, step=step)
    state = parts.evaluated(state)  # the parameters' EMA, when the run kept one
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return Run(run_dir=run_dir, config=cfg, parts=parts, variables=variables)
