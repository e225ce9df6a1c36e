"""cnnjax's ResNet against torchvision's architecture, written out in plain torch below.

The torch model is torchvision's `ResNet`/`BasicBlock` code reduced to what ResNet-18/34 use
(torchvision itself is not a dependency): random weights, random batch-norm affine parameters and
running statistics, eval mode. Its state_dict is saved to a file the way a user's torchvision
weights would be, read back by `cnnjax.nn.convert`, and both models' logits on one batch must agree
to 1e-4.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

from cnnjax.nn import convert
from cnnjax.config import ModelConfig  # noqa: E402
from cnnjax.nn.models import build_model  # noqa: E402
from cnnjax.nn.resnet import ResNet18, ResNet34  # noqa: E402
from fixtures import TinyResNet  # noqa: E402


# --- torchvision.models.resnet, BasicBlock only ------------------------------------------------

class TorchBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    """torchvision's ResNet; `small_stem` swaps conv1 for 3x3/1 and drops the max-pool."""

    def __init__(self, layers, num_classes=1000, width=64, small_stem=False, in_channels=3):
        super().__init__()
        self.inplanes = width
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [TorchBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [TorchBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics (fresh ones are 1/0 and would hide a
    mix-up of scale/bias or mean/var); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(7)
    return model.eval()


def torch_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def save(model: nn.Module, path) -> None:
    torch.save(model.state_dict(), path)


def converted_logits(flax_model, path, images, **kw) -> np.ndarray:
    template = jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, *images.shape[1:])))
    variables = convert.load_torch_weights(path, template, **kw)
    return np.asarray(jax.jit(flax_model.apply)(variables, jnp.asarray(images)))


def images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- architecture ---------------------------------------------------------------------------------

def test_parameter_counts_match_torchvision():
    x = jnp.zeros((1, 64, 64, 3))
    count = lambda m: sum(math.prod(p.shape) for p in jax.tree.leaves(
        jax.eval_shape(m.init, jax.random.key(0), x)["params"]))
    assert count(ResNet18()) == 11_689_512  # torchvision.models.resnet18()
    assert count(ResNet34()) == 21_797_672  # torchvision.models.resnet34()
    assert count(ResNet18()) == sum(p.numel() for p in TorchResNet([2, 2, 2, 2]).parameters())


def test_build_model_presets_and_errors():
    model = build_model(ModelConfig(name="resnet18", kwargs=dict(stem="small", width=16)), 5)
    assert (model.stage_sizes, model.width, model.stem, model.num_classes) == ((2, 2, 2, 2), 16, "small", 5)
    assert build_model(ModelConfig(name="resnet_tiny"), 10).width == 8
    with pytest.raises(ValueError, match="stem must be one of"):
        build_model(ModelConfig(name="resnet18", kwargs=dict(stem="tiny")), 10)
    with pytest.raises(ValueError, match="grayscale must be one of"):
        build_model(ModelConfig(name="resnet18", kwargs=dict(grayscale="rgb")), 10)


def test_feature_shape_and_intermediates():
    model = TinyResNet(num_classes=3)
    x = jnp.zeros((2, 28, 28, 1))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    logits, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(variables, x)
    inter = state["intermediates"]
    assert logits.shape == (2, 3)
    assert inter["layer4_out"][0].shape[1:] == model.feature_shape((28, 28)) == (4, 4, 64)
    assert inter["stem_out"][0].shape == (2, 28, 28, 8) and inter["features"][0].shape == (2, 64)
    # torchvision's init: conv N(0, 2 / fan_out), fc U(+-1/sqrt(fan_in)), BN scale 1 and bias 0.
    kernel = np.asarray(variables["params"]["layer4"]["0"]["conv2"]["kernel"])  # (3, 3, 64, 64)
    assert abs(kernel.std() / np.sqrt(2 / (9 * 64)) - 1) < 0.02 and abs(kernel.mean()) < 2e-3
    fc = np.asarray(variables["params"]["fc"]["kernel"])
    assert np.abs(fc).max() <= 1 / 8 and np.abs(fc).max() > 0.1
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], 1.0)


# --- converting torchvision weights ---------------------------------------------------------------

def test_resnet18_imagenet_stem_matches_torch(tmp_path):
    torch.manual_seed(0)
    reference = randomized(TorchResNet([2, 2, 2, 2]), seed=1)
    save(reference, tmp_path / "resnet18.pth")
    x = images((4, 64, 64, 3))
    ours = converted_logits(ResNet18(), tmp_path / "resnet18.pth", x)
    theirs = torch_logits(reference, x)
    assert ours.shape == theirs.shape == (4, 1000)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(theirs).max() > 0.1  # the comparison is not between two near-zero outputs


def test_resnet18_small_stem_matches_torch_from_safetensors(tmp_path):
    save_file = pytest.importorskip("safetensors.torch").save_file
    torch.manual_seed(1)
    reference = randomized(TorchResNet([2, 2, 2, 2], num_classes=10, small_stem=True), seed=2)
    save_file(reference.state_dict(), tmp_path / "small.safetensors")
    x = images((2, 32, 32, 3))
    ours = converted_logits(ResNet18(num_classes=10, stem="small"), tmp_path / "small.safetensors", x)
    np.testing.assert_allclose(ours, torch_logits(reference, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("grayscale", ["repeat", "stem"])
def test_grayscale_input_matches_rgb_model_on_repeated_image(tmp_path, grayscale):
    torch.manual_seed(2)
    reference = randomized(TorchResNet([1, 1, 1, 1], num_classes=10, width=8), seed=3)
    save(reference, tmp_path / "rgb.pth")
    gray = images((3, 28, 28, 1))
    model = ResNet18(stage_sizes=(1, 1, 1, 1), num_classes=10, width=8, grayscale=grayscale)
    ours = converted_logits(model, tmp_path / "rgb.pth", gray,
                            gray_stem="conv1" if grayscale == "stem" else None)
    theirs = torch_logits(reference, np.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_new_head_keeps_initialization_and_skips_torch_fc(tmp_path):
    reference = randomized(TorchResNet([1, 1, 1, 1], num_classes=1000, width=8), seed=4)
    save(reference, tmp_path / "w.pth")
    model = TinyResNet(num_classes=5, stem="imagenet")
    init = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 28, 28, 1)))
    loaded = convert.load_torch_weights(tmp_path / "w.pth", init, keep=("fc",))
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], init["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(loaded["params"]["layer1"]["0"]["conv1"]["kernel"],
                                  reference.layer1[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded["batch_stats"]["layer2"]["0"]["downsample"]["1"]["var"],
                                  reference.layer2[0].downsample[1].running_var.numpy())


def test_converter_names_every_missing_mis_shaped_and_unused_key(tmp_path):
    state = randomized(TorchResNet([1, 1, 1, 1], num_classes=10, width=8), seed=5).state_dict()
    del state["layer1.0.bn1.running_var"]
    state["layer3.0.conv2.weight"] = torch.zeros(32, 32, 5, 5)
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    model = TinyResNet(num_classes=10, stem="imagenet")
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
    with pytest.raises(ValueError) as err:
        convert.load_torch_weights(tmp_path / "bad.pth", template)
    message = str(err.value)
    assert "3 problems" in message
    assert "layer1.0.bn1.running_var: missing (for batch_stats/layer1/0/bn1/var, torch shape (8,))" in message
    assert ("layer3.0.conv2.weight: shape (32, 32, 5, 5) does not fit params/layer3/0/conv2/kernel, "
            "which needs torch shape (32, 32, 3, 3)") in message
    assert "extra.weight: shape (3,) in the file, not read by the model" in message


def test_converter_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        convert.read_state_dict(tmp_path / "resnet18.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        convert.read_state_dict(tmp_path / "w.npz")
    torch.save({"epoch": 3, "state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="flat state_dict"):
        convert.read_state_dict(tmp_path / "ckpt.pth")
