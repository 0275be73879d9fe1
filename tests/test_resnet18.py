"""The resnet18 preset against torchvision's ResNet-18.

torchvision's wheel on this package index does not import beside the CPU build of torch
("operator torchvision::nms does not exist"), so these tests build the same network as a small
PyTorch module with torchvision's structure and exact attribute names (TorchvisionResNet18
below: torchvision/models/resnet.py's BasicBlock and ResNet for layers=[2, 2, 2, 2], whose
state_dict keys are torchvision's resnet18's), give it random weights and random BatchNorm
statistics, save it with torch.save and with safetensors, load the file into minicnn with
minicnn.load_weights, and compare the logits in eval mode (float64 to 1e-8 relative, float32 to
1e-4). The input is small (2 x 3 x 64 x 64, and an odd 37 x 45) to keep the tests fast.
"""
import numpy as np
import pytest

import minicnn
from minicnn.nn import zoo

torch = pytest.importorskip("torch")
nn = torch.nn


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, as it is written there."""

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
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TorchvisionResNet18(nn.Module):
    """torchvision.models.resnet.ResNet(BasicBlock, [2, 2, 2, 2]): resnet18's modules, names
    and forward."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _random_torchvision(num_classes, seed=0):
    """TorchvisionResNet18 with random weights (He-scaled convs) and random BatchNorm weights,
    biases and running statistics, in eval mode."""
    torch.manual_seed(seed)
    net = TorchvisionResNet18(num_classes)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory):
    """A random torchvision-structured ResNet-18 (10 classes) and its weights saved both ways."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("resnet18")
    net = _random_torchvision(10)
    torch.save(net.state_dict(), folder / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              folder / "resnet18.safetensors")
    return net, folder


def test_the_keys_are_torchvisions():
    ours = zoo.resnet18(num_classes=10, rng=np.random.default_rng(0)).state_dict()
    theirs = TorchvisionResNet18(10).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
                "layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias"):
        assert key in ours


@pytest.mark.parametrize("file", ["resnet18.pth", "resnet18.safetensors"])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-8), (np.float32, 1e-4)])
def test_torchvision_weights_give_torchvisions_logits(torchvision_files, file, dtype, rtol):
    net, folder = torchvision_files
    model = zoo.resnet18(num_classes=10, dtype=dtype, rng=np.random.default_rng(1))
    assert minicnn.load_weights(model, folder / file) == ([], [])
    twin = net.double() if dtype == np.float64 else net.float()
    for size in ((64, 64), (37, 45)):
        x = np.random.default_rng(2).standard_normal((2, 3) + size).astype(dtype)
        with torch.no_grad():
            want = twin(torch.from_numpy(x)).numpy()
        got = model.forward(x)
        assert got.dtype == dtype and got.shape == (2, 10)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    if dtype == np.float64 and file.endswith(".pth"):      # the readable maths agrees too
        with minicnn.use("reference"):
            np.testing.assert_allclose(model.forward(x), want, rtol=rtol,
                                       atol=rtol * np.abs(want).max())
    net.float()


def test_minicnn_weights_load_into_torchvisions_network(tmp_path):
    """The other way: minicnn's resnet18, saved by save_weights, loads strictly into the
    torchvision-structured network, which then gives minicnn's logits."""
    from safetensors.torch import load_file
    model = zoo.resnet18(num_classes=5, rng=np.random.default_rng(3))
    for name, array in model.state.items():            # statistics as a trained model's
        array[...] = (np.random.default_rng(4).uniform(0.5, 2, array.shape)
                      if name.endswith("running_var") else
                      np.random.default_rng(5).normal(0, 0.2, array.shape))
    minicnn.save_weights(model, tmp_path / "ours.safetensors")
    net = TorchvisionResNet18(5).eval()
    net.load_state_dict(load_file(tmp_path / "ours.safetensors"), strict=True)
    x = np.random.default_rng(6).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.forward(x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_torchvisions_1000_class_file_into_a_10_class_model_says_which_keys(torchvision_files):
    _, folder = torchvision_files
    with pytest.raises(minicnn.errors.StateDictError,
                       match=r"mis-shaped 'fc.weight' is \(10, 512\), expected \(1000, 512\); "
                             r"'fc.bias' is \(10,\), expected \(1000,\)"):
        minicnn.load_weights(zoo.resnet18(), folder / "resnet18.pth")


def test_the_preset_summary_and_parameter_count():
    """torchvision's resnet18 has 11,689,512 parameters (1000 classes)."""
    lines = []
    zoo.build_model("resnet18", num_classes=1000, rng=np.random.default_rng(0),
                    image_size=(64, 64)).summary((3, 64, 64), print_fn=lines.append)
    text = "\n".join(lines)
    assert "Total params: 11,689,512" in text
    assert "GlobalAveragePooling2D            ('N', 512)" in text
    assert "downsample: Conv2D" in text and "MaxPool2D                         ('N', 64, 16, 16)" \
        in text
    model = zoo.build_model("resnet18", num_classes=7, rng=np.random.default_rng(0))
    assert sum(p.size for p in model.params.values()) == 11_689_512 - 513_000 + 513 * 7


def test_resnet18_saves_and_loads_as_a_minicnn_file(tmp_path):
    model = zoo.resnet18(num_classes=3, rng=np.random.default_rng(0))
    model.save(tmp_path / "r.npz")
    loaded = minicnn.load(tmp_path / "r.npz")
    assert list(loaded.state_dict()) == list(model.state_dict())
    x = np.random.default_rng(1).standard_normal((1, 3, 40, 40)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))


def test_the_trainer_trains_resnet18(tmp_path, monkeypatch):
    """python -m minicnn.train --model resnet18 on a tiny image folder: a run whose checkpoint
    holds torchvision's keys."""
    from _data_helpers import make_folder
    from minicnn.training import trainer
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "shapes", per_class=8)
    out = tmp_path / "run"
    assert trainer.main(["--data", str(folder), "--model", "resnet18", "--out", str(out),
                         "--epochs", "1", "--batch-size", "8", "--image-size", "32",
                         "--val-split", "0.25", "--no-tta"]) == 0
    model = minicnn.load(out / "last.npz")
    assert "layer4.1.bn2.running_var" in model.state_dict()
    assert model["fc"].out_features == len([p for p in folder.iterdir() if p.is_dir()])
