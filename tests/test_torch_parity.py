"""cnnjax against PyTorch, the seed program's framework, as the independent numerical reference.

The seed's model is written out in plain torch below and its weights are converted both ways:
conv kernels OIHW <-> HWIO, and the first Dense layer's rows permuted, because torch flattens the
(C, H, W) feature map while cnnjax flattens (H, W, C). Everything is float32 on both sides.

Why the optimizer is compared on shared gradients (teacher forcing): the two frameworks' float32
gradients differ by ~1e-7 relative (different summation orders), and Adam amplifies that noise
wherever a gradient element is near zero: its step lr * g / (|g| + eps) has slope lr / eps = 1e5
there, and a ReLU that switches on one side only changes a whole row. Measured with the seed's init:
~3e-6 apart after one step, ~2e-3 after 20, with no bug on either side. So each step's gradient is
computed once, by torch, and given to both optimizers; the gradients themselves are compared in
their own test, and the end-to-end train-step test widens its 1e-5 tolerance only by this
amplification, element by element (and requires all but a few in 1e3 within 1e-5 anyway).
"""

from __future__ import annotations

import collections
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from torch import nn  # noqa: E402

from cnnjax.config import OptimConfig  # noqa: E402
from cnnjax.nn.models import SeedCNN  # noqa: E402
from cnnjax.training.optim import make_optimizer, make_plateau, plateau_step  # noqa: E402

MEAN, STD = 0.1307, 0.3081  # the seed's transforms.Normalize constants
IMAGE_HW = (28, 28)
FEATURE_HWC = SeedCNN().feature_shape(IMAGE_HW)  # (7, 7, 64): the map fc1 reads
LR, WEIGHT_DECAY, EPS = 1e-3, 1e-5, 1e-8


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


# --- the seed's model in plain torch, and the weight layouts --------------------------------------

def torch_seed_cnn(init: str = "seed", seed: int = 0, weight_scale: float = 1.0) -> nn.Sequential:
    """The seed program's network. init='seed': conv N(0, 0.01), linear Xavier-uniform, biases 0
    (as the seed program and cnnjax's SeedCNN); init='torch': torch's default init, whose logits
    are O(0.1) rather than O(0.01), times `weight_scale` to reach large logits."""
    torch.manual_seed(seed)
    h, w, c = FEATURE_HWC
    model = nn.Sequential(collections.OrderedDict([
        ("conv1", nn.Conv2d(1, 32, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(c * h * w, 128)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(128, 10)),
    ]))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if init == "seed":
                    if isinstance(module, nn.Conv2d):
                        nn.init.normal_(module.weight, 0.0, 0.01)
                    else:
                        nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
                module.weight.mul_(weight_scale)
    return model


def torch_to_flax(tensors: dict[str, np.ndarray]) -> dict:
    """torch parameters (or their gradients), by state-dict name -> a cnnjax SeedCNN params tree."""
    h, w, c = FEATURE_HWC
    fc1 = tensors["fc1.weight"]  # (out, C*H*W), C slowest
    return {
        "conv1": {"kernel": tensors["conv1.weight"].transpose(2, 3, 1, 0),
                  "bias": tensors["conv1.bias"]},
        "conv2": {"kernel": tensors["conv2.weight"].transpose(2, 3, 1, 0),
                  "bias": tensors["conv2.bias"]},
        "fc1": {"kernel": fc1.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1),
                "bias": tensors["fc1.bias"]},
        "fc2": {"kernel": tensors["fc2.weight"].T, "bias": tensors["fc2.bias"]},
    }


def flax_to_torch(params) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: a SeedCNN params tree -> torch state-dict arrays."""
    h, w, c = FEATURE_HWC
    p = jax.tree.map(np.asarray, params)
    fc1 = p["fc1"]["kernel"]  # (H*W*C, out), C fastest
    out = {
        "conv1.weight": p["conv1"]["kernel"].transpose(3, 2, 0, 1),
        "conv1.bias": p["conv1"]["bias"],
        "conv2.weight": p["conv2"]["kernel"].transpose(3, 2, 0, 1),
        "conv2.bias": p["conv2"]["bias"],
        "fc1.weight": fc1.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(fc1.shape[1], -1),
        "fc1.bias": p["fc1"]["bias"],
        "fc2.weight": p["fc2"]["kernel"].T, "fc2.bias": p["fc2"]["bias"],
    }
    return {k: np.array(v, order="C") for k, v in out.items()}  # writable copies, as torch wants


def torch_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_grads(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}


def load_into_torch(model: nn.Module, params) -> None:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_torch(params).items()})


def to_jax(tree):
    return jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a)), tree)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def normalized_batch(rng: np.random.Generator, batch: int = 32):
    """Random uint8 pixels normalized as the seed does, and labels: what the models see."""
    pixels = rng.integers(0, 256, (batch, *IMAGE_HW, 1), dtype=np.uint8)
    images = ((pixels.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
    return images, rng.integers(0, 10, batch).astype(np.int32)


def mean_xent(model: nn.Module, params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def max_abs_diff(params, tensors: dict[str, np.ndarray]) -> dict[str, float]:
    ours = flax_to_torch(params)
    return {k: float(np.max(np.abs(ours[k] - tensors[k]))) for k in tensors}


# --- conversion -----------------------------------------------------------------------------------

@functools.cache
def seed_params():
    """cnnjax's own SeedCNN init (the seed program's), computed once for the module."""
    init = jax.jit(SeedCNN().init)
    return init(jax.random.key(1), jnp.zeros((1, *IMAGE_HW, 1), jnp.float32))["params"]


def test_conversion_round_trips_exactly():
    params = seed_params()
    back = torch_to_flax(flax_to_torch(params))
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
    state = torch_state(torch_seed_cnn("torch"))
    again = flax_to_torch(torch_to_flax(state))
    for k in state:
        np.testing.assert_array_equal(again[k], state[k])


# --- forward and backward -------------------------------------------------------------------------

# 'flax_seed': cnnjax's own init converted flax -> torch (the seed's init; logits ~0.02);
# 'torch' and 'torch_x4': torch's default init converted torch -> flax (logits ~0.2 and ~50).
INITS = ["flax_seed", "torch", "torch_x4"]
# The tests above run SeedCNN's default ('auto') conv lowering; these hold the same bounds for
# the others (cnnjax/nn/conv.py), F(4x4, 3x3), the least exact, in the large-logit regime.
LOWERINGS = [("winograd", "flax_seed"), ("winograd4", "torch_x4")]


def paired_models(init: str, lowering: str = "auto"):
    model = SeedCNN(conv_lowering=lowering)
    if init == "flax_seed":
        params = seed_params()
        reference = torch_seed_cnn("torch")
        load_into_torch(reference, params)
    else:
        reference = torch_seed_cnn("torch", weight_scale=4.0 if init == "torch_x4" else 1.0)
        params = to_jax(torch_to_flax(torch_state(reference)))
    return model, params, reference


@pytest.mark.parametrize("init", INITS)
def test_logits_match_torch(init, lowering="auto"):
    model, params, reference = paired_models(init, lowering)
    images, _ = normalized_batch(np.random.default_rng(0))
    ours = np.asarray(model.apply({"params": params}, images))
    with torch.no_grad():
        theirs = reference(nchw(images)).numpy()
    largest = float(np.abs(theirs).max())
    # 1e-5 relative to the largest logit: stricter than 1e-5 absolute where logits are small (the
    # seed's init gives ~0.02), and the meaningful bound where they are large. Measured: ~6e-7.
    assert np.abs(ours - theirs).max() <= 1e-5 * largest
    if init == "torch_x4":
        assert np.abs(theirs).max() > 10  # the relative regime is exercised


def test_fc1_needs_its_rows_permuted():
    """Without the (C, H, W) -> (H, W, C) row permutation the converted network is another one."""
    model, params, reference = paired_models("torch")
    naive = dict(params, fc1={"kernel": jnp.asarray(torch_state(reference)["fc1.weight"].T),
                              "bias": params["fc1"]["bias"]})
    images, _ = normalized_batch(np.random.default_rng(0))
    with torch.no_grad():
        theirs = reference(nchw(images)).numpy()
    assert np.abs(np.asarray(model.apply({"params": naive}, images)) - theirs).max() > 1e-2


@pytest.mark.parametrize("lowering, init", LOWERINGS)
def test_logits_match_torch_with_each_conv_lowering(lowering, init):
    test_logits_match_torch(init, lowering)


@pytest.mark.parametrize("init", INITS)
def test_cross_entropy_gradients_match_torch(init, lowering="auto"):
    model, params, reference = paired_models(init, lowering)
    images, labels = normalized_batch(np.random.default_rng(1))
    loss, grads = jax.value_and_grad(mean_xent, argnums=1)(model, params, images, labels)
    torch_loss = nn.functional.cross_entropy(reference(nchw(images)),
                                             torch.from_numpy(labels).long())
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5)
    expected = torch_to_flax(torch_grads(reference))
    for layer in expected:
        for name in expected[layer]:
            ours, theirs = np.asarray(grads[layer][name]), expected[layer][name]
            assert np.linalg.norm(theirs) > 0, (layer, name)
            rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
            assert rel <= 1e-5, (layer, name, rel)


@pytest.mark.parametrize("lowering, init", LOWERINGS)
def test_cross_entropy_gradients_match_torch_with_each_conv_lowering(lowering, init):
    test_cross_entropy_gradients_match_torch(init, lowering)


# --- the optimizer --------------------------------------------------------------------------------

def train_side_by_side(tx: optax.GradientTransformation, amsgrad: bool, steps: int = 20
                       ) -> list[float]:
    """`steps` Adam steps in both frameworks from the seed's init, on the same batches and the same
    (torch-computed) gradients; returns the largest parameter difference after each step."""
    reference = torch_seed_cnn("seed", seed=1)
    params = to_jax(torch_to_flax(torch_state(reference)))
    opt_state = tx.init(params)
    opt = torch.optim.Adam(reference.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                           amsgrad=amsgrad)
    reference.train()

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(2)
    errors = []
    for _ in range(steps):
        images, labels = normalized_batch(rng, 16)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(reference(nchw(images)), torch.from_numpy(labels).long())
        loss.backward()
        grads = to_jax(torch_to_flax(torch_grads(reference)))
        opt.step()
        params, opt_state = update(grads, opt_state, params)
        errors.append(max(max_abs_diff(params, torch_state(reference)).values()))
    return errors


@pytest.mark.parametrize("amsgrad", [True, False])
def test_optimizer_matches_torch_adam_for_20_steps(amsgrad):
    errors = train_side_by_side(make_optimizer(OptimConfig(amsgrad=amsgrad)), amsgrad)
    assert max(errors) <= 1e-5, errors


def test_stock_optax_amsgrad_does_not_match_torch():
    """Why `scale_by_torch_adam` exists: optax's AMSGrad takes the max of the bias-corrected second
    moment, torch the max of the raw one. Equal on step 1 (nothing to take a max over yet), then the
    stock transform drifts far beyond float32 noise."""
    stock = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.scale_by_amsgrad(eps=EPS),
                        optax.scale_by_learning_rate(LR))
    errors = train_side_by_side(stock, amsgrad=True)
    assert errors[0] <= 1e-5
    assert errors[-1] > 1e-4, errors


# --- the plateau rule -----------------------------------------------------------------------------

# Validation losses, one per epoch. Relative to the best so far, torch's threshold is 1e-4: a drop
# of 0.5e-4 is "no improvement", 2e-4 is one. With patience 3, the long flat tail forces cut after
# cut until the learning rate sits at min_lr (1e-3 * 0.5**10 < 1e-6).
PLATEAU_LOSSES = [
    1.0, 0.9, 0.8,                     # improving
    0.8, 0.8, 0.8, 0.8,                # flat: the 4th bad epoch cuts (patience 3)
    0.79996, 0.79992 + 1e-6,           # dips smaller than the threshold: still bad epochs
    0.7998,                            # 2.5e-4 relative: an improvement, counter reset
    0.81, 0.85, 0.7999,                # worse, worse, then a sub-threshold dip
    0.79964,                           # 2e-4 below 0.7998: improvement
    0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9,
    0.795,                             # improvement after a long climb
    0.79495, 0.79496, 0.79497, 0.79498, 0.79499, 0.795, 0.795, 0.795,
    0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8,
    0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8,
    0.7,                               # an improvement at min_lr changes nothing
    0.7, 0.7, 0.7, 0.7, 0.7,
]


def torch_plateau_lrs(losses, patience: int) -> list[float]:
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5,
                                                           patience=patience, min_lr=1e-6)
    lrs = []
    for loss in losses:
        scheduler.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_plateau_rule_matches_reduce_lr_on_plateau(patience):
    cfg = OptimConfig(plateau_patience=patience)
    plateau = make_plateau(cfg)
    state = plateau.init({"w": jnp.zeros(1, jnp.float32)})
    step = jax.jit(lambda state, loss: plateau_step(plateau, state, loss))  # eager: ~0.15 s a call
    ours = []
    for loss in PLATEAU_LOSSES:
        state = step(state, loss)
        ours.append(cfg.learning_rate * float(state.scale))
    theirs = torch_plateau_lrs(PLATEAU_LOSSES, patience)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert theirs[-1] == pytest.approx(1e-6)  # the sequence drives every patience to min_lr
    assert len(set(theirs)) >= 10  # ... through every cut


# --- one train step end to end --------------------------------------------------------------------

@functools.cache
def cnnjax_training(microbatch=None):
    """The model, optimizer, plateau rule and compiled train step, built once per microbatch."""
    from cnnjax.training.steps import make_train_step  # imports the data modules

    cfg = OptimConfig()
    model, tx, plateau = SeedCNN(), make_optimizer(cfg), make_plateau(cfg)
    return model, tx, plateau, make_train_step(model, tx, MEAN, STD, microbatch=microbatch)


@pytest.mark.parametrize("plateau_scale,microbatch", [(1.0, None), (0.25, None), (1.0, 16)])
def test_train_step_matches_one_torch_step(plateau_scale, microbatch):
    """`make_train_step` (uint8 in, normalized inside, loss, grads, coupled decay, AMSGrad, plateau
    scale; in one pass, or in four passes of 16 images) against the seed's torch step with
    lr = 1e-3 * scale."""
    from cnnjax.training.steps import create_train_state

    model, tx, plateau, train_step = cnnjax_training(microbatch)
    reference = torch_seed_cnn("seed", seed=3)
    start = to_jax(torch_to_flax(torch_state(reference)))
    state = create_train_state(model, tx, plateau, (*IMAGE_HW, 1), jax.random.key(0))
    state = state.replace(params=start, opt_state=tx.init(start),
                          plateau_state=state.plateau_state._replace(
                              scale=jnp.asarray(plateau_scale, jnp.float32)))
    rng = np.random.default_rng(3)
    batch = {"image": rng.integers(0, 256, (64, *IMAGE_HW, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, 64).astype(np.int32),
             "index": np.arange(64, dtype=np.int32)}  # keys per-example draws; none at defaults
    state, metrics = train_step(state, batch, jax.random.key(1))

    reference.train()
    opt = torch.optim.Adam(reference.parameters(), lr=LR * plateau_scale, weight_decay=WEIGHT_DECAY,
                           amsgrad=True)
    x = (nchw(batch["image"]).float() / 255.0 - MEAN) / STD
    loss = nn.functional.cross_entropy(reference(x), torch.from_numpy(batch["label"]).long())
    opt.zero_grad()
    loss.backward()
    before = torch_state(reference)
    grads = torch_grads(reference)
    opt.step()
    after = torch_state(reference)

    assert bool(metrics["finite"])
    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        norm = np.sqrt(sum(np.sum(grads[f"{layer}.{n}"].astype(np.float64) ** 2)
                           for n in ("weight", "bias")))
        assert float(metrics[f"grad_norm/{layer}"]) == pytest.approx(norm, rel=1e-5)

    # Adam's first step, lr * g / (|g| + eps) per element, moves by lr * eps / (|g| + eps)**2 per
    # unit of gradient error: up to lr / eps = 1e5 near g = 0. So each element may differ by 1e-5
    # plus that sensitivity times a gradient error of 1e-5 of the tensor's rms (the tolerance of
    # the gradient test), and all but a few in 1e3 by 1e-5 alone.
    ours = flax_to_torch(state.params)
    plain = total = 0
    for name in after:
        noise = 1e-5 * np.sqrt(np.mean(grads[name].astype(np.float64) ** 2))
        effective = np.abs(grads[name] + WEIGHT_DECAY * before[name]).astype(np.float64)
        slack = LR * plateau_scale * EPS * noise / (effective + EPS) ** 2
        diff = np.abs(ours[name] - after[name])
        assert np.all(diff <= 1e-5 + slack), (name, diff.max())
        plain += int((diff <= 1e-5).sum())
        total += diff.size
    assert plain / total >= 0.999, plain / total
