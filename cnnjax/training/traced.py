"""Config values held as arrays: one compiled train step for configs that differ only in them.

The members of a `cnnjax sweep` grid over such values (learning rate, dropout, ...) train with one
program under `vmap`: each member's values ride beside its train state as float32 scalars
(`values_of`), and the step builds its model, optimizer, augmentation and loss from the config
with those arrays in place (`with_values`), through the same factories that build a run. The
factories' eager checks look at numbers only; every value was checked as a number in its member's
own config (`builder.build`) before. What no config value reaches (the train state's layout, the
evaluation step) is the same for all of them.

A value that would change a shape or the program itself (a width, the batch size, turning
momentum on, the optimizer's name) cannot be one of these: `cnnjax.training.grid` refuses it.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import numpy as np

from cnnjax.config import Config
from cnnjax.nn.layers import TracedRate


def _keep(rate: float) -> float:
    """Dropout's keep probability 1 - rate, in Python's double as a constant rate's (TracedRate)."""
    return 1.0 - rate


# key -> (the number the program holds for the config's value, what the factories receive)
TRACEABLE: dict[str, tuple[Callable[[float], float], Callable[[Any], Any]]] = {
    **{f"optim.{name}": (float, lambda a: a) for name in
       ("learning_rate", "weight_decay", "b1", "b2", "eps", "momentum")},
    **{f"model.kwargs.{name}": (_keep, TracedRate) for name in ("dropout", "conv_dropout")},
    "train.label_smoothing": (float, lambda a: a),
    **{f"augment.{name}": (float, lambda a: a) for name in
       ("rotate", "translate", "scale", "mixup", "cutmix")},
}


def values_of(cfg: Config, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The config's values at `keys` as the program holds them: float32 scalars."""
    return {key: np.float32(TRACEABLE[key][0](float(cfg.get(key)))) for key in keys}


def with_values(cfg: Config, values: Mapping[str, Any]) -> Config:
    """`cfg` with the (traced) arrays of `values` in place of its numbers at their keys.

    The arrays go in without the config's own checks (they are not numbers to compare); each
    member's numbers passed them already."""
    sections: dict[str, Any] = {}
    for key, value in values.items():
        section_name, field, *path = key.split(".")
        section = sections.get(section_name) or copy.copy(getattr(cfg, section_name))
        wrapped = TRACEABLE[key][1](value)
        if path:  # an entry of a dict field: model.kwargs.dropout
            entries = dict(getattr(section, field))
            entries[path[0]] = wrapped
            wrapped = entries
        object.__setattr__(section, field, wrapped)
        sections[section_name] = section
    out = copy.copy(cfg)
    for name, section in sections.items():
        object.__setattr__(out, name, section)
    return out
