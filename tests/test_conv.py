"""cnnjax.nn.conv.Conv against flax's nn.Conv (same init, autodiff's gradients) and torch's conv2d.

For thin inputs its forward is written out as taps (1-2 input channels) and its kernel and bias
gradients come from a hand-written rule (one matrix product over input patches); elsewhere it is
XLA's convolution and autodiff; every path is checked here on geometries with strides, asymmetric
padding and H != W.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.nn.conv import TAPS_MAX, Conv

CASES = [  # (in channels, kernel, stride, padding, bias)
    (1, 3, 1, ((1, 1), (1, 1)), True),    # the seed CNN's conv1: taps, the patches rule
    (3, 3, 2, ((0, 1), (1, 0)), True),    # RGB, strided, asymmetric padding: patches rule
    (1, 5, 1, ((2, 2), (2, 2)), False),   # no bias: taps, patches rule, bias gradient dropped
    (5, 3, 1, ((1, 1), (1, 1)), True),    # 45 taps > TAPS_MAX: autodiff's gradients
    (8, 3, 2, ((0, 0), (0, 0)), False),
]


def _loss(module):
    return lambda params, x: jnp.sum(jnp.sin(module.apply(params, x)))


@pytest.mark.parametrize("cin, k, stride, padding, bias", CASES)
def test_conv_matches_flax_conv_values_and_gradients(cin, k, stride, padding, bias):
    x = jax.random.normal(jax.random.key(0), (6, 13, 11, cin))
    kwargs = dict(strides=stride, padding=padding, use_bias=bias,
                  bias_init=nn.initializers.normal(1.0))
    ours, ref = Conv(7, (k, k), **kwargs), nn.Conv(7, (k, k), **kwargs)
    params, ref_params = ours.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)  # same init from the same key

    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6, atol=1e-6)
    g_ours, gx_ours = jax.grad(_loss(ours), argnums=(0, 1))(params, x)
    g_ref, gx_ref = jax.grad(_loss(ref), argnums=(0, 1))(params, x)
    # float32 sums in another order: errors scale with the gradient's largest entry
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max())), g_ours, g_ref)
    np.testing.assert_allclose(gx_ours, gx_ref, rtol=1e-5, atol=1e-5)


def test_patches_rule_matches_torch_conv2d_gradients():
    torch = pytest.importorskip("torch")
    x = np.asarray(jax.random.normal(jax.random.key(2), (4, 12, 10, 3)))
    g = np.asarray(jax.random.normal(jax.random.key(3), (4, 6, 5, 8)))
    conv = Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)))
    assert 3 * 3 * 3 <= TAPS_MAX
    params = conv.init(jax.random.key(4), jnp.asarray(x))
    (grads,) = jax.vjp(lambda p: conv.apply(p, jnp.asarray(x)), params)[1](jnp.asarray(g))

    weight = torch.tensor(np.asarray(params["params"]["kernel"]).transpose(3, 2, 0, 1),
                          requires_grad=True)
    bias = torch.tensor(np.asarray(params["params"]["bias"]), requires_grad=True)
    out = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), weight,
                                     bias, stride=2, padding=1)
    out.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(grads["params"]["kernel"],
                               weight.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grads["params"]["bias"], bias.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_conv_names_bad_input():
    with pytest.raises(ValueError, match="NHWC"):
        Conv(4, (3, 3)).init(jax.random.key(0), jnp.zeros((28, 28, 1)))
