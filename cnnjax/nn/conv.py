"""2-D convolution with bias, lowered per pass: XLA's convolution, Winograd, taps or patches.

A convolution's passes (the forward of a differentiated call, the input gradient, the kernel
gradient, and the forward of an undifferentiated call: inference) each have a lowering:
- 'xla': XLA's NHWC/HWIO convolution (and autodiff's gradient convolutions), as `nn.Conv` lowers it.
- 'winograd' / 'winograd4': Winograd F(2x2, 3x3) / F(4x4, 3x3) (cnnjax/nn/winograd.py), for stride-1
  3x3 layers only: 2.25x / 4x fewer multiplications as one batched matrix product.
- 'taps' (forward and inference): for layers with few input taps (kh*kw*in <= TAPS_MAX), the
  kh*kw*in broadcast multiply-adds written out, which XLA fuses with the bias and activation into
  one loop; XLA:CPU's convolution with 1-3 input channels has nothing to contract and runs the
  seed CNN's conv1 several times slower.
- 'patches' (kernel gradient only): kernel and bias gradients as one matrix product,
  [patches, 1]^T @ g, for layers with few input taps (kh*kw*in <= TAPS_MAX: the first layer on 1-
  or 3-channel images), where autodiff feeds a weight-gradient convolution through two transposes
  of the full-resolution gradient and a separate tree reduction (5-10% of the seed CNN's step).

A lowering spec names them as 'forward/input_grad/kernel_grad[/inference]' (e.g.
'winograd/xla/patches'; inference defaults to the forward's), or by a preset: 'xla' (all passes),
'winograd' / 'winograd4' (Winograd wherever the layer allows it), 'auto' (the choice measured
fastest on XLA:CPU, `auto_lowering`; docs/performance.md). The choice is a fixed function of the
spec and the layer's shape (its rows included), never timed at run time, so the same config
gives the same program and the same bits. All lowerings equal `lax.conv_general_dilated` up to
float rounding (tests/test_conv.py, tests/test_winograd.py).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.nn import winograd

TAPS_MAX = 32
_DN = ("NHWC", "HWIO", "NHWC")
WINOGRAD = {"winograd": 2, "winograd4": 4}  # lowering name -> output tile m of F(m x m, 3 x 3)
CHOICES = {"forward": ("xla", *WINOGRAD, "taps"), "input_grad": ("xla", *WINOGRAD),
           "kernel_grad": ("xla", *WINOGRAD, "patches"), "inference": ("xla", *WINOGRAD, "taps")}
PRESETS = ("auto", "xla", *WINOGRAD)

Pads = tuple[tuple[int, int], tuple[int, int]]


class Lowering(NamedTuple):
    """How each pass of one convolution is computed (names from CHOICES)."""

    forward: str = "xla"
    input_grad: str = "xla"
    kernel_grad: str = "xla"
    inference: str = "xla"  # the forward when nothing differentiates the call (evaluation)


def winograd_eligible(kernel_hw: Sequence[int], strides: Sequence[int]) -> bool:
    return tuple(kernel_hw) == (3, 3) and tuple(strides) == (1, 1)


# 'auto' takes taps for the forward of thin layers with at most this many input channels (the
# seed CNN's train step +7-18% at batch 32-512). Measured on 64 rows, conv + ReLU + pool and their
# gradients: 1 channel 3x3 -43% time (5x5 -10%), 2 channels -15%, 3 channels (RGB) +8%. Their
# inference stays XLA's: under evaluation's compiler options XLA fuses the whole forward pass into
# one YNNPACK graph, which taps would split (docs/performance.md).
TAPS_FORWARD_CHANNELS = 2

# Inference on at most this many rows takes Winograd F(2x2, 3x3) in wide stride-1 3x3 layers: the
# seed CNN's batch-32 evaluation ran 1.4-1.7x faster with it in conv2 on a quiet machine, batch 64
# 0.85-0.9x, 128 0.4x (its transformed tiles leave the caches). Training keeps XLA's passes, each
# of which beat Winograd's at 32-64 rows (docs/performance.md).
WINOGRAD_INFERENCE_ROWS = 32


def auto_lowering(kernel_shape: Sequence[int], strides: Sequence[int], rows: int) -> Lowering:
    """The lowering measured fastest on XLA:CPU for this layer shape and `rows` (images in the
    call; docs/performance.md); on accelerators XLA's own (cuDNN picks its algorithms)."""
    kh, kw, cin, _ = kernel_shape
    if jax.default_backend() != "cpu":
        return Lowering()
    thin = kh * kw * cin <= TAPS_MAX
    winograd_inference = (not thin and rows <= WINOGRAD_INFERENCE_ROWS
                          and winograd_eligible((kh, kw), strides))
    taps = thin and cin <= TAPS_FORWARD_CHANNELS
    return Lowering("taps" if taps else "xla", "xla", "patches" if thin else "xla",
                    "winograd" if winograd_inference else "xla")


def resolve_lowering(spec: str, kernel_shape: Sequence[int], strides: Sequence[int],
                     rows: int = 1, layer: str = "conv") -> Lowering:
    """The `Lowering` a spec (a preset or 'forward/input_grad/kernel_grad[/inference]') gives this
    layer on `rows` images per call."""
    kh, kw, cin, _ = kernel_shape
    eligible = winograd_eligible((kh, kw), strides)
    if spec == "auto":
        return auto_lowering(kernel_shape, strides, rows)
    if spec == "xla":
        return Lowering()
    if spec in WINOGRAD:
        return Lowering(spec, spec, spec, spec) if eligible else Lowering()
    parts = spec.split("/")
    if len(parts) not in (3, 4):
        raise ValueError(f"conv lowering {spec!r} for {layer} is neither a preset "
                         f"({', '.join(PRESETS)}) nor 'forward/input_grad/kernel_grad[/inference]',"
                         f" e.g. 'winograd/xla/patches'.")
    parts = parts if len(parts) == 4 else [*parts, parts[0]]
    for (pass_, choices), part in zip(CHOICES.items(), parts):
        if part not in choices:
            raise ValueError(f"conv lowering {spec!r} for {layer}: the {pass_} lowering must be "
                             f"one of {', '.join(choices)}, got {part!r}.")
        if part in WINOGRAD and not eligible:
            raise ValueError(f"conv lowering {spec!r} for {layer}: Winograd needs a 3x3 kernel "
                             f"and stride 1, this layer has {kh}x{kw} stride {tuple(strides)}; use "
                             f"'xla' (or 'patches' for the kernel gradient) there.")
    for pass_, part in zip(CHOICES, parts):
        if part in ("patches", "taps") and kh * kw * cin > TAPS_MAX:
            raise ValueError(f"conv lowering {spec!r} for {layer}: '{part}' (the {pass_}) is for "
                             f"thin layers (kh*kw*in <= {TAPS_MAX}), this one has "
                             f"{kh * kw * cin} taps; use 'xla'.")
    return Lowering(*parts)


def layer_specs(spec: str, layers: int) -> tuple[str, ...]:
    """One lowering spec per conv layer from 'SPEC' (every layer) or 'SPEC1,SPEC2,...' (in
    order)."""
    specs = tuple(s.strip() for s in spec.split(","))
    if len(specs) == 1:
        return specs * layers
    if len(specs) != layers:
        raise ValueError(f"conv_lowering={spec!r} gives {len(specs)} lowerings for "
                         f"{layers} conv layers; give one for all of them or one per layer.")
    return specs


def _conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _pad(x: jax.Array, padding: Pads) -> jax.Array:
    """Zero padding of H and W; negative widths crop, as in `lax.conv_general_dilated`."""
    cfg = [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)]
    return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _shifted(xp: jax.Array, kernel_hw, strides) -> list[jax.Array]:
    """The (N, out_h, out_w, in) input window under each kernel tap (i, j) of a padded input, in
    the kernel's HW order."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    return [xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]


def _patches(x, kernel_hw, strides, padding) -> jax.Array:
    """(M, kh*kw*in) input patches, columns in the kernel's HWI order, M = N*out_h*out_w."""
    taps = _shifted(_pad(x, padding), kernel_hw, strides)
    return jnp.concatenate(taps, axis=-1).reshape(-1, len(taps) * x.shape[-1])


def _taps(x, kernel, strides, padding) -> jax.Array:
    """The convolution as kh*kw*in broadcast multiply-adds of shifted input planes, accumulated in
    at least f32. Elementwise, so XLA fuses it with the bias and activation into one loop."""
    kh, kw, cin, _ = kernel.shape
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    # Materialized once: fused into the taps' loop, the input's producers (the pass's row gather,
    # normalization, padding) ran once per tap, which cost all of the gain at 8 passes per step.
    xp = lax.optimization_barrier(_pad(x, padding).astype(acc_dtype))
    weights = kernel.astype(acc_dtype).reshape(kh * kw, cin, -1)
    acc = None
    for window, w in zip(_shifted(xp, (kh, kw), strides), weights):
        for c in range(cin):
            term = window[..., c:c + 1] * w[c]
            acc = term if acc is None else acc + term
    return acc.astype(jnp.result_type(x, kernel))


def _forward(x, kernel, strides, padding, how):
    """The convolution by `how`, and the transformed input if Winograd made one."""
    if how in WINOGRAD:
        return winograd.forward(x, kernel, padding, WINOGRAD[how])
    if how == "taps":
        return _taps(x, kernel, strides, padding), None
    return _conv(x, kernel, strides, padding), None


def _conv_bias(x, kernel, bias, strides, padding, lowering):
    """Only called where nothing differentiates it (`_conv_bias_fwd` is, otherwise): inference."""
    return _forward(x, kernel, strides, padding, lowering.inference)[0] + bias


def _conv_bias_fwd(x, kernel, bias, strides, padding, lowering):
    y, v = _forward(x, kernel, strides, padding, lowering.forward)
    reuse = lowering.kernel_grad == lowering.forward  # the kernel gradient reads the same V
    return y + bias, (x, kernel, v if reuse else None)


def _conv_bias_bwd(strides, padding, lowering, residuals, g):
    x, kernel, v = residuals
    kh, kw, _, cout = kernel.shape
    if lowering.input_grad in WINOGRAD:
        dx = winograd.input_grad(g, kernel, padding, WINOGRAD[lowering.input_grad])
    else:
        dx = jax.vjp(lambda x_: _conv(x_, kernel, strides, padding), x)[1](g)[0]
    if lowering.kernel_grad == "patches":
        patches = _patches(x, (kh, kw), strides, padding)
        ones = jnp.ones((patches.shape[0], 1), patches.dtype)
        grads = jnp.concatenate([patches, ones], axis=1).T @ g.reshape(-1, cout)
        return dx, grads[:-1].reshape(kernel.shape), grads[-1]
    if lowering.kernel_grad in WINOGRAD:
        m = WINOGRAD[lowering.kernel_grad]
        v = winograd.transform_input(x, padding, m) if v is None else v
        dk = winograd.kernel_grad(v, g, m)
    else:
        dk = jax.vjp(lambda k_: _conv(x, k_, strides, padding), kernel)[1](g)[0]
    return dx, dk, jnp.sum(g, axis=(0, 1, 2))


_conv_bias = jax.custom_vjp(_conv_bias, nondiff_argnums=(3, 4, 5))
_conv_bias.defvjp(_conv_bias_fwd, _conv_bias_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, strides: tuple[int, int],
           padding: Pads, lowering: Lowering | None = None) -> jax.Array:
    """NHWC x HWIO (+ bias) -> NHWC; `padding` is explicit ((top, bottom), (left, right)).

    `lowering` None is `auto_lowering`'s for this shape; all-'xla' is plain autodiff."""
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv2d expects NHWC input and an HWIO kernel with matching channels, "
                         f"got shapes {x.shape} and {kernel.shape}.")
    strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
    if lowering is None:
        lowering = auto_lowering(kernel.shape, strides, x.shape[0])
    if lowering == Lowering():
        y = _conv(x, kernel, strides, padding)
        return y if bias is None else y + bias
    if bias is None:
        bias = jnp.zeros((kernel.shape[-1],), x.dtype)  # its gradient is computed, then dropped
    return _conv_bias(x, kernel, bias, strides, padding, Lowering(*lowering))


class Conv(nn.Module):
    """`nn.Conv` for NHWC input on `conv2d`: the same params ('kernel' (kh, kw, in, out), 'bias'),
    created in the same order, so the same key gives the same values."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: Pads = ((0, 0), (0, 0))
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    lowering: str = "auto"  # a spec for `resolve_lowering`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)  # as nn.Conv: f64 in, f64 out
        strides = (self.strides, self.strides)
        lowering = resolve_lowering(self.lowering, kernel.shape, strides, x.shape[0],
                                    self.name or "conv")
        return conv2d(x, kernel, bias, strides, self.padding, lowering)


def conv_lowerings(model: nn.Module, image_shape: Sequence[int], rows: int
                   ) -> dict[str, dict[str, str]]:
    """{layer path: {pass: lowering}} for every `Conv` in `model` on (H, W, C) images, `rows` of
    them per call (the images per device in one pass: 'auto' picks inference by it), e.g. for a
    run's summary. Traces `model.init` abstractly (nothing is computed)."""
    found: dict[str, dict[str, str]] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, Conv) and context.method_name == "__call__":
            shape = (*module.kernel_size, args[0].shape[-1], module.features)
            found["/".join(module.path)] = resolve_lowering(
                module.lowering, shape, (module.strides, module.strides), args[0].shape[0],
                module.name)._asdict()
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0),
                       jnp.zeros((rows, *image_shape), jnp.float32))
    return found
