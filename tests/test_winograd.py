"""Every convolution lowering against `lax.conv_general_dilated` in float64, forward and gradients.

The reference is XLA's direct convolution and autodiff's gradients computed in float64, so the
float32 lowerings (Winograd's transforms, the patches product, XLA's own float32 convolution) are
each measured against an exact answer, not against one another. The bound is the issue's: every
tensor within 1e-5 of the reference relative to the reference's largest entry. Shapes, paddings
(negative ones included: lax.pad crops) and batch sizes are drawn at random from a fixed seed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax.config import ModelConfig
from cnnjax.nn.conv import (TAPS_MAX, Lowering, conv2d, conv_lowerings, layer_specs,
                            resolve_lowering)
from cnnjax.nn.models import build_model

BOUND = 1e-5
LOWERINGS = [  # (forward, input_grad, kernel_grad, inference): each pass meets each choice once
    Lowering("winograd", "winograd4", "xla", "winograd4"),
    Lowering("winograd4", "xla", "winograd", "winograd"),
    Lowering("xla", "winograd", "winograd4", "xla"),
]


def _geometries(count: int, seed: int = 0):
    """(batch, h, w, in, out, padding) drawn at random; odd sizes leave partial Winograd tiles."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        pads = tuple(tuple(int(p) for p in rng.integers(-1, 3, 2)) for _ in range(2))
        yield (int(rng.integers(1, 6)), int(rng.integers(5, 16)), int(rng.integers(5, 16)),
               int(rng.integers(1, 20)), int(rng.integers(1, 12)), pads)


def _reference(x, kernel, bias, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST) + bias


def _check(lowerings, batch, h, w, cin, cout, padding, strides=(1, 1), kernel_hw=(3, 3), seed=0):
    """Each lowering's output and gradients (at a random cotangent) against the float64 ones."""
    rng = np.random.default_rng(seed)  # numpy draws: jax.random compiles a program per shape
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    x, kernel, bias = normal(batch, h, w, cin), normal(*kernel_hw, cin, cout), normal(cout)

    def outputs(conv):
        """(output, undifferentiated output, input, kernel and bias gradients at g), one program."""
        def run(x, kernel, bias, g):
            y, vjp = jax.vjp(conv, x, kernel, bias)
            return (y, conv(x, kernel, bias), *vjp(g))
        return jax.jit(run)

    with jax.enable_x64(True):
        args64 = [np.asarray(a, np.float64) for a in (x, kernel, bias)]
        shape = jax.eval_shape(lambda *a: _reference(*a, strides, padding), *args64).shape
        g = normal(*shape)
        expected = [np.asarray(t) for t in outputs(
            lambda *a: _reference(*a, strides, padding))(*args64, g.astype(np.float64))]
    for lowering in lowerings:
        got = outputs(lambda *a: conv2d(*a, strides, padding, lowering))(x, kernel, bias, g)
        assert all(t.dtype == jnp.float32 for t in got) and got[0].shape == shape
        for name, a, b in zip(("output", "inference", "input grad", "kernel grad", "bias grad"),
                              got, expected):
            err = np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()
            assert err <= BOUND, (lowering, name, err)


@pytest.mark.parametrize("geometry", list(_geometries(2)), ids=str)
def test_lowerings_match_float64_convolution(geometry):
    _check(LOWERINGS, *geometry)


def test_seed_cnn_conv2_in_winograd4_stays_within_bound():
    """F(4x4, 3x3) has the larger rounding; the seed CNN's widest layer (32 -> 64, 14x14)."""
    _check([Lowering(*["winograd4"] * 4)], 8, 14, 14, 32, 64, ((1, 1), (1, 1)))


@pytest.mark.parametrize("strides, padding", [((1, 1), ((1, 1), (1, 1))),
                                              ((2, 1), ((0, 1), (2, 0)))])
def test_patches_kernel_gradient_matches_float64_convolution(strides, padding):
    _check([Lowering("xla", "xla", "patches")], 3, 13, 10, 3, 8, padding, strides)
    _check([Lowering("xla", "xla", "patches")], 2, 9, 12, 1, 5, padding, strides, kernel_hw=(5, 5))


@pytest.mark.parametrize("strides, padding, kernel_hw, cin", [
    ((1, 1), ((1, 1), (1, 1)), (3, 3), 1),   # the seed CNN's conv1
    ((2, 1), ((0, 1), (2, 0)), (3, 3), 3),   # RGB, strided, asymmetric
    ((1, 2), ((-1, 2), (1, -1)), (5, 5), 1),  # negative padding crops, as lax.pad does
])
def test_taps_forward_matches_float64_convolution(strides, padding, kernel_hw, cin):
    for batch in (1, 4):
        _check([Lowering("taps", "xla", "patches", "taps"), Lowering("taps", "xla", "xla", "xla")],
               batch, 12, 9, cin, 6, padding, strides, kernel_hw, seed=batch)


def test_taps_keeps_the_input_dtype_and_accumulates_in_float32():
    rng = np.random.default_rng(0)
    x, kernel = rng.standard_normal((2, 8, 8, 3)), rng.standard_normal((3, 3, 3, 4))
    pads = ((1, 1), (1, 1))
    exact = np.asarray(_reference(x, kernel, 0.0, (1, 1), pads))  # numpy float64 in, float64 out
    lowering = Lowering("taps", "xla", "patches", "taps")
    got = conv2d(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16), None, (1, 1),
                 pads, lowering)
    assert got.dtype == jnp.bfloat16
    # inputs rounded to bf16 (8 bits) then 27 products summed in f32: one bf16 rounding at the end
    err = np.abs(np.asarray(got, np.float64) - exact).max() / np.abs(exact).max()
    assert err < 2 ** -6, err
    # against the exact convolution of the bf16-rounded inputs, only that last rounding (2^-9 of
    # each output; summing in bf16 gave 7.8e-3 here)
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (x, kernel)]
    of_rounded = np.asarray(_reference(*rounded, 0.0, (1, 1), pads))
    err = np.abs(np.asarray(got, np.float64) - of_rounded).max() / np.abs(of_rounded).max()
    assert err < 2 ** -8, err


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="'auto' is XLA's own off the CPU")
def test_auto_lowering_of_the_seed_cnn():
    model = build_model(ModelConfig(), 10)
    small, large = conv_lowerings(model, (28, 28, 1), 32), conv_lowerings(model, (28, 28, 1), 64)
    assert small["conv1"] == large["conv1"] == dict(  # 9 taps <= TAPS_MAX: taps, patches product
        forward="taps", input_grad="xla", kernel_grad="patches", inference="xla")
    assert small["conv2"] == dict(forward="xla", input_grad="xla", kernel_grad="xla",
                                  inference="winograd")  # faster at <= 32 rows, slower above
    assert large["conv2"] == dict(forward="xla", input_grad="xla", kernel_grad="xla",
                                  inference="xla")


def test_a_lowering_per_layer():
    per_layer = conv_lowerings(
        build_model(ModelConfig(kwargs={"conv_lowering": "xla,winograd/xla/xla/winograd4"}), 10), (28, 28, 1),
        8)
    assert per_layer == {
        "conv1": dict(forward="xla", input_grad="xla", kernel_grad="xla", inference="xla"),
        "conv2": dict(forward="winograd", input_grad="xla", kernel_grad="xla",
                      inference="winograd4")}


def test_winograd_preset_falls_back_where_the_layer_does_not_allow_it():
    assert resolve_lowering("winograd", (3, 3, 4, 4), (2, 2)) == Lowering()
    assert resolve_lowering("winograd", (5, 5, 4, 4), (1, 1)) == Lowering()
    assert resolve_lowering("winograd4", (3, 3, 4, 4), (1, 1)) == Lowering(*["winograd4"] * 4)
    assert resolve_lowering("winograd/xla/xla", (3, 3, 4, 4), (1, 1)).inference == "winograd"


@pytest.mark.parametrize("spec, shape, strides, message", [
    ("fast", (3, 3, 1, 8), (1, 1), "neither a preset"),
    ("winograd/xla", (3, 3, 1, 8), (1, 1), "neither a preset"),
    ("direct/xla/xla", (3, 3, 1, 8), (1, 1), "forward lowering must be one of"),
    ("xla/patches/xla", (3, 3, 1, 8), (1, 1), "input_grad lowering must be one of"),
    ("xla/xla/xla/patches", (3, 3, 1, 8), (1, 1), "inference lowering must be one of"),
    ("xla/xla/xla/xla/xla", (3, 3, 1, 8), (1, 1), "neither a preset"),
    ("winograd/xla/xla", (3, 3, 1, 8), (2, 2), "3x3 kernel and stride 1"),
    ("xla/xla/patches", (3, 3, 32, 8), (1, 1), f"kh\\*kw\\*in <= {TAPS_MAX}"),
    ("taps/xla/xla", (3, 3, 32, 8), (1, 1), "'taps' \\(the forward\\) is for thin layers"),
    ("xla/taps/xla", (3, 3, 1, 8), (1, 1), "input_grad lowering must be one of"),
])
def test_bad_lowering_specs_are_named(spec, shape, strides, message):
    with pytest.raises(ValueError, match=message):
        resolve_lowering(spec, shape, strides, layer="conv2")


def test_a_lowering_per_layer_needs_one_per_layer():
    assert layer_specs("xla", 3) == ("xla",) * 3
    with pytest.raises(ValueError, match="gives 3 lowerings for 2 conv layers"):
        build_model(ModelConfig(kwargs={"conv_lowering": "xla,xla,xla"}), 10)
