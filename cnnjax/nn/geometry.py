"""Output-size arithmetic for convolution and pooling windows.

One function, `output_size`, implements `floor((W - F + 2P) / S) + 1` and the 'same'/'valid'
conventions; models size their flatten with it and reject impossible layers with it, so a bad
geometry fails with a readable message before XLA compiles anything.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

Padding = Union[str, int, tuple[int, int]]


def _check_positive(layer: str, what: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{layer}: {what} must be a positive integer, got {value!r}.")


def explicit_padding(padding: Padding, window: int, stride: int, size: int, layer: str = "layer"
                     ) -> tuple[int, int]:
    """Resolves 'valid', 'same', P or (lo, hi) into the (lo, hi) zero padding of one spatial axis.

    'same' pads as TensorFlow and XLA do: output = ceil(size / stride), the odd pixel on the high side.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0)
        if mode == "same":
            out = -(-size // stride)
            total = max((out - 1) * stride + window - size, 0)
            return (total // 2, total - total // 2)
        raise ValueError(f"{layer}: padding must be 'valid', 'same', an int or a (lo, hi) pair, "
                         f"got {padding!r}.")
    if isinstance(padding, int):
        pads = (padding, padding)
    else:
        pads = tuple(padding)
    if len(pads) != 2 or any(not isinstance(p, int) or p < 0 for p in pads):
        raise ValueError(f"{layer}: padding must be non-negative, got {padding!r}.")
    return pads


def output_size(size: int, window: int, stride: int = 1, padding: Padding = 0,
                layer: str = "layer") -> int:
    """Spatial output size of a window of width F sliding with stride S over W inputs.

    With explicit padding P this is floor((W - F + 2P) / S) + 1, the rule torch's Conv2d and
    MaxPool2d (ceil_mode=False) use. Raises ValueError naming `layer` and the sizes when the result
    would be empty or the window does not fit.
    """
    _check_positive(layer, "input size", size)
    _check_positive(layer, "window", window)
    _check_positive(layer, "stride", stride)
    lo, hi = explicit_padding(padding, window, stride, size, layer)
    padded = size + lo + hi
    if window > padded:
        raise ValueError(
            f"{layer}: window {window} is larger than its input {size} (padded to {padded}); "
            f"use a smaller window, more padding, or a larger input.")
    out = math.floor((padded - window) / stride) + 1
    if out <= 0:
        raise ValueError(f"{layer}: output size {out} from input {size}, window {window}, "
                         f"stride {stride}, padding {padding!r} is not positive.")
    return out


def output_shape(hw: Sequence[int], window: int, stride: int = 1, padding: Padding = 0,
                 layer: str = "layer") -> tuple[int, int]:
    """`output_size` applied to both spatial axes of an (H, W) pair."""
    return tuple(output_size(s, window, stride, padding, layer) for s in hw)
