"""Window arithmetic and pooling against hand-computed cases, numpy, and PyTorch (NCHW; ours NHWC).

`output_size` is checked on random geometries against the shapes torch's conv2d and max_pool2d
actually produce, and against the error torch raises when the output would be empty. The pools
are checked value for value (and gradient for gradient) against torch's, on both of their code
paths: the reshape path taken when stride == window, and `lax.reduce_window` otherwise. The torch
parts skip without torch; the hand-computed table always runs.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st
from jax import lax

from cnnjax.config import ModelConfig
from cnnjax.nn.geometry import output_shape, output_size
from cnnjax.nn.layers import avg_pool, global_avg_pool, global_max_pool, max_pool
from cnnjax.nn.models import build_model, check_geometry

PROPERTY = settings(max_examples=200, deadline=None)


@pytest.fixture(scope="module")
def torch():
    """torch, or a skip; module-scoped so that hypothesis tests may use it."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads cost more than they give
    torch.manual_seed(0)
    yield torch
    torch.set_num_threads(threads)


# --- output_size: worked examples -----------------------------------------------------------------

@pytest.mark.parametrize("size, window, stride, padding, expected", [
    (28, 3, 1, 1, 28),        # (28 - 3 + 2) / 1 + 1: the seed's convs keep the size
    (28, 5, 2, 0, 12),        # floor(23 / 2) + 1
    (7, 3, 2, 1, 4),          # (7 - 3 + 2) / 2 + 1
    (7, 3, 2, "same", 4),     # ceil(7 / 2), padded 1 + 1
    (5, 3, 1, "valid", 3),    # 5 - 3 + 1
    (28, 2, 2, 0, 14),        # the seed's pools halve
    (7, 2, 2, 0, 3),          # floor mode drops the 7th row
    (1, 3, 1, 1, 1),          # a 1-pixel input fits a 3-window once padded
    (10, 4, 3, (1, 2), 4),    # asymmetric padding: floor((10 - 4 + 3) / 3) + 1
])
def test_output_size_worked_examples(size, window, stride, padding, expected):
    assert output_size(size, window, stride, padding) == expected


def test_output_shape_applies_to_both_axes():
    assert output_shape((28, 9), 3, 2, 1) == (14, 5)


# --- output_size: errors --------------------------------------------------------------------------

@pytest.mark.parametrize("size, window, stride, padding, needles", [
    (28, 3, 0, 1, ["conv7", "stride", "0"]),
    (5, 9, 1, 0, ["conv7", "window 9", "input 5"]),
    (5, 9, 1, "valid", ["conv7", "window 9", "input 5"]),
    (5, 8, 1, 1, ["conv7", "window 8", "input 5", "padded to 7"]),
    (28, 3, 1, -1, ["conv7", "padding", "-1"]),
    (28, 3, 1, (0, -2), ["conv7", "padding", "-2"]),
    (28, 0, 1, 0, ["conv7", "window", "0"]),
    (0, 3, 1, 1, ["conv7", "input size", "0"]),
    (28, 3, 1, "full", ["conv7", "padding", "full"]),
])
def test_impossible_geometry_raises_naming_the_layer(size, window, stride, padding, needles):
    with pytest.raises(ValueError) as err:
        output_size(size, window, stride, padding, layer="conv7")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


# --- output_size: against torch on random geometries ----------------------------------------------

def _torch_size(run) -> int | None:
    """The spatial output size of a torch op, or None when torch refuses the geometry."""
    try:
        return run().shape[-1]
    except RuntimeError:
        return None


def _assert_same_rule(expected: int | None, size, window, stride, padding, layer):
    event("torch refuses" if expected is None else "torch runs")
    if expected is None:
        with pytest.raises(ValueError, match=layer):
            output_size(size, window, stride, padding, layer=layer)
    else:
        assert output_size(size, window, stride, padding, layer=layer) == expected


@PROPERTY
@given(size=st.integers(1, 32), window=st.integers(1, 12), stride=st.integers(1, 6),
       padding=st.integers(0, 6))
def test_output_size_is_torch_conv2d(torch, size, window, stride, padding):
    x, w = torch.zeros(1, 1, size, size), torch.zeros(1, 1, window, window)
    expected = _torch_size(lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=padding))
    _assert_same_rule(expected, size, window, stride, padding, "conv_x")


@st.composite
def pool_geometry(draw):
    window = draw(st.integers(1, 12))
    # torch requires padding <= window / 2 for pooling
    size, stride, padding = draw(st.integers(1, 32)), draw(st.integers(1, 6)), draw(
        st.integers(0, window // 2))
    return size, window, stride, padding


@PROPERTY
@given(geometry=pool_geometry())
def test_output_size_is_torch_max_pool2d(torch, geometry):
    size, window, stride, padding = geometry
    x = torch.zeros(1, 1, size, size)
    expected = _torch_size(lambda: torch.nn.functional.max_pool2d(
        x, window, stride=stride, padding=padding))
    _assert_same_rule(expected, size, window, stride, padding, "pool_x")


@PROPERTY
@given(size=st.integers(1, 32), window=st.integers(1, 12), stride=st.integers(1, 6))
def test_same_padding_is_xlas(size, window, stride):
    """'same' gives ceil(W / S) for any window: TensorFlow's and XLA's rule."""
    same = output_size(size, window, stride, "same")
    assert same == math.ceil(size / stride)
    xla = jax.eval_shape(lambda x, w: lax.conv_general_dilated(x, w, (stride,), "SAME"),
                         jax.ShapeDtypeStruct((1, 1, size), jnp.float32),
                         jax.ShapeDtypeStruct((1, 1, window), jnp.float32))
    assert same == xla.shape[-1]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@PROPERTY
@given(size=st.integers(1, 32), window=st.integers(1, 12), stride=st.integers(1, 6))
def test_same_and_valid_padding_are_torchs(torch, size, window, stride):
    """torch has 'same' at stride 1 only; 'valid' is padding 0 at any stride."""
    x, w = torch.zeros(1, 1, size, size), torch.zeros(1, 1, window, window)
    if stride == 1:
        same = torch.nn.functional.conv2d(x, w, padding="same").shape[-1]
        assert output_size(size, window, stride, "same") == same
    expected = _torch_size(lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding="valid"))
    _assert_same_rule(expected, size, window, stride, "valid", "conv_v")


# --- pooling values and gradients against torch ---------------------------------------------------

POOL_CASES = [  # (window, stride, padding); stride None or == window takes the reshape path
    (2, None, 0),
    (3, 3, 0),
    (2, 2, 1),
    (3, 3, 1),
    (4, 4, 2),
    (3, 2, 1),   # overlapping: lax.reduce_window
    (3, 1, 1),
    (2, 1, 0),
    (5, 3, 2),
]


def tie_free_images(shape, seed=0) -> np.ndarray:
    """Distinct values, so every window has one maximum and max-pool gradients are unambiguous."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    return (rng.permutation(n).reshape(shape) / n - 0.5).astype(np.float32)


def to_nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("window, stride, padding", POOL_CASES)
def test_pools_match_torch_values_and_gradients(torch, kind, window, stride, padding):
    x = tie_free_images((2, 11, 9, 3))  # H != W and odd: catches swapped axes and floor mode
    ours_fn = {"max": max_pool, "avg": avg_pool}[kind]
    ours, vjp = jax.vjp(lambda x: ours_fn(x, window, stride, padding), jnp.asarray(x))
    cotangent = tie_free_images(ours.shape, seed=1)
    (grad,) = vjp(jnp.asarray(cotangent))

    xt = to_nchw(torch, x).requires_grad_(True)
    stride_t = window if stride is None else stride
    if kind == "max":
        theirs = torch.nn.functional.max_pool2d(xt, window, stride_t, padding)
    else:
        theirs = torch.nn.functional.avg_pool2d(xt, window, stride_t, padding,
                                                count_include_pad=True)
    theirs.backward(to_nchw(torch, cotangent))

    assert ours.shape == to_nhwc(theirs).shape
    if kind == "max":
        np.testing.assert_array_equal(np.asarray(ours), to_nhwc(theirs))
    else:
        np.testing.assert_allclose(np.asarray(ours), to_nhwc(theirs), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), to_nhwc(xt.grad), rtol=1e-6, atol=1e-7)


def test_max_pool_splits_the_gradient_among_tied_maxima_like_autodiff():
    """Hand-made ties (ReLU zeros make them common): each window's cotangent is shared equally
    among its maxima, as autodiff of `max` does; cnnjax's pool has its own gradient rule."""
    x = jnp.asarray([[0.0, 0.0, 1.0, 2.0],
                     [0.0, 0.0, 2.0, 2.0],
                     [3.0, -1.0, 5.0, 4.0],
                     [-2.0, 3.0, 1.0, 0.0]]).reshape(1, 4, 4, 1)
    g = jnp.asarray([4.0, 6.0, 2.0, 8.0]).reshape(1, 2, 2, 1)
    (grad,) = jax.vjp(lambda x: max_pool(x, 2), x)[1](g)
    expected = np.asarray([[1.0, 1.0, 0.0, 2.0],
                           [1.0, 1.0, 2.0, 2.0],
                           [1.0, 0.0, 8.0, 0.0],
                           [0.0, 1.0, 0.0, 0.0]]).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(np.asarray(grad), expected)
    autodiff = jax.vjp(lambda x: x.reshape(1, 2, 2, 2, 2, 1).max(axis=(2, 4)), x)[1](g)[0]
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(autodiff))


def test_pool_layer_name_in_errors():
    with pytest.raises(ValueError, match="pool9.*window 4.*input 3"):
        max_pool(jnp.zeros((1, 3, 3, 1)), 4, layer="pool9")
    with pytest.raises(ValueError, match="avg_pool.*rank 4"):
        avg_pool(jnp.zeros((3, 3, 1)))


def test_global_pools_match_numpy():
    x = tie_free_images((3, 5, 7, 4))
    np.testing.assert_array_equal(np.asarray(global_max_pool(jnp.asarray(x))), x.max(axis=(1, 2)))
    np.testing.assert_allclose(np.asarray(global_avg_pool(jnp.asarray(x))), x.mean(axis=(1, 2)),
                               rtol=1e-6, atol=1e-7)
    assert global_max_pool(jnp.asarray(x)).shape == (3, 4)


# --- SeedCNN's shapes against the same network in torch -------------------------------------------

def torch_blocks(torch, cfg, image_hw=(28, 28)):
    """The (C, H, W) shape after each conv and pool of a SeedCNN's network (`cfg`: the module)
    built in torch, by name."""
    nn = torch.nn
    x = torch.zeros(1, 1, *image_hw)
    shapes, in_ch = {}, 1
    for i, width in enumerate(cfg.features, start=1):
        k, s, p = cfg.kernel_size, cfg.stride, cfg.padding
        if p == "same" and s > 1:  # torch has no strided 'same': pad as TensorFlow does, by hand
            pads = []
            for size in reversed(x.shape[2:]):  # ZeroPad2d wants (left, right, top, bottom)
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = nn.ZeroPad2d(tuple(pads))(x)
            p = 0
        x = nn.functional.relu(nn.Conv2d(in_ch, width, k, stride=s, padding=p)(x))
        shapes[f"conv{i}"] = tuple(x.shape[1:])
        pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[cfg.pool]
        x = pool(cfg.pool_size, cfg.pool_stride or cfg.pool_size)(x)
        shapes[f"pool{i}"] = tuple(x.shape[1:])
        in_ch = width
    return shapes


def seed_cnn(**kwargs):
    return build_model(ModelConfig(kwargs=kwargs), 10)


SHAPE_CONFIGS = [
    seed_cnn(),  # the seed: padding 1, stride 1, max pool 2
    seed_cnn(padding="same"),
    seed_cnn(padding="valid"),
    seed_cnn(padding=0, stride=2),
    seed_cnn(padding=1, stride=2, pool="avg"),
    seed_cnn(padding="same", stride=2, kernel_size=4, features=(8, 16)),  # 28-14-7-4-2
    seed_cnn(kernel_size=5, padding=2, pool_size=3, pool_stride=2, features=(8, 16)),
]


@pytest.mark.parametrize("cfg", SHAPE_CONFIGS, ids=lambda c: f"{c.padding}-s{c.stride}-{c.pool}")
def test_seed_cnn_shapes_match_torch(torch, cfg):
    model = cfg
    expected = torch_blocks(torch, cfg)
    images = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
    variables, shapes = traced_init(model, images)
    for name, (c, h, w) in expected.items():
        assert shapes[name] == (4, h, w, c), name
    c, h, w = expected[f"pool{len(cfg.features)}"]
    assert model.feature_shape((28, 28)) == (h, w, c)
    assert variables["params"]["fc1"]["kernel"].shape == (h * w * c, cfg.dense[0])
    assert shapes[f"fc{len(cfg.dense) + 1}"] == (4, 10)


def traced_init(model, images):
    """`model.init` traced for shapes only (nothing computed), and the output shape of each named
    submodule's call, recorded by a method interceptor."""
    shapes = {}

    def record(call, args, kwargs, context):
        out = call(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name:
            shapes[context.module.name] = out.shape
        return out

    with nn.intercept_methods(record):
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return variables, shapes


def test_feature_maps_can_be_read_from_intermediates():
    model = seed_cnn()
    images = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["intermediates"]),
                              variables, images)
    shapes = {name: value[0].shape for name, value in state["intermediates"].items()}
    assert shapes == {"conv1_out": (4, 28, 28, 32), "pool1_out": (4, 14, 14, 32),
                      "conv2_out": (4, 14, 14, 64), "pool2_out": (4, 7, 7, 64), "fc1_out": (4, 128)}


IMPOSSIBLE = [
    (seed_cnn(kernel_size=9, padding="valid", features=(8, 16, 32)), "conv3"),  # 28-20-10-2-1
    (seed_cnn(pool_size=4, features=(8, 16, 32)), "pool3"),  # 28-7-1, then a 4-window on 1
]


@pytest.mark.parametrize("cfg, layer", IMPOSSIBLE)
def test_impossible_model_fails_at_init_naming_the_layer(cfg, layer):
    model = cfg
    with pytest.raises(ValueError, match=layer):
        model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.float32))
    with pytest.raises(ValueError, match=layer):
        check_geometry(model, (28, 28, 1))


@pytest.mark.parametrize("cfg, layer", IMPOSSIBLE)
def test_torch_cannot_run_the_impossible_models_either(torch, cfg, layer):
    with pytest.raises(RuntimeError):
        torch_blocks(torch, cfg)
