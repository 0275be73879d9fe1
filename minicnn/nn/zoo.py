"""Model presets, by name: the classic Keras-tutorial CNN, a stronger residual net, the
Keras cats-vs-dogs tutorial's dropout net, and torchvision's ResNet-18 (its parameter names
too, so that its ImageNet weights load: minicnn.load_weights). Each takes image_size=(H, W)
and sizes the layers that depend on it (a Dense layer after Flatten, a final global pool) for
that size."""
import numpy as np

from minicnn.nn.containers import Residual, Sequential
from minicnn.nn.layers import (BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                               GlobalAveragePooling2D, MaxPool2D, ReLU)
from minicnn.ops.im2col import conv_output_size, to_pair


def _image_size(image_size):
    """An int or a pair -> (H, W), positive Python ints."""
    return to_pair(image_size, "image_size", minimum=1)


def _output_size(layers, image_size, name):
    """(OH, OW) after the unpadded convs and pools among layers (others keep the size), as
    conv_output_size counts them; ValueError naming the preset when the image is too small."""
    h, w = size = _image_size(image_size)
    for layer in layers:
        if isinstance(layer, (Conv2D, MaxPool2D)):
            assert layer.padding in ("valid", (0, 0)), layer     # the arithmetic is unpadded
            h, w = (conv_output_size(n, k, s, 0, 0)
                    for n, k, s in zip((h, w), layer.kernel_size, layer.stride))
            if min(h, w) < 1:
                raise ValueError(f"{name} needs larger images than {size[0]}x{size[1]}.")
    return h, w


def keras_tutorial(num_classes=10, in_channels=3, rng=None, dtype=np.float32,
                   image_size=(32, 32)):
    """The TensorFlow/Keras CNN tutorial's net (122,570 parameters for 32x32 images):
    Conv 32 - MaxPool - Conv 64 - MaxPool - Conv 64 - Dense 64 - Dense 10, 3x3 valid convs, ReLU.
    The first Dense layer's input is 64 * OH * OW, the last conv's output size for image_size
    (4x4 for 32x32); at least 18x18.
    """
    rng = rng if rng is not None else np.random.default_rng()
    d = dict(rng=rng, dtype=dtype)
    features = [
        Conv2D(in_channels, 32, 3, **d), ReLU(), MaxPool2D(2),      # (32, 15, 15) for 32x32
        Conv2D(32, 64, 3, **d), ReLU(), MaxPool2D(2),               # (64, 6, 6)
        Conv2D(64, 64, 3, **d), ReLU(),                             # (64, 4, 4)
    ]
    oh, ow = _output_size(features, image_size, "keras-tutorial")
    return Sequential(features + [
        Flatten(), Dense(64 * oh * ow, 64, **d), ReLU(), Dense(64, num_classes, **d),
    ])


def resnet_small(num_classes=10, in_channels=3, rng=None, dtype=np.float32, widths=(32, 64, 128),
                 image_size=(32, 32)):
    """A ResNet-9-style net (Page, "How to train your ResNet", 2018) slimmed for a 2-core CPU
    (408,746 parameters, whatever the image size).

    Three stages that each downsample with conv -> max-pool -> BN -> ReLU (pooling before BN and
    ReLU does their work on a quarter of the pixels, as airbench does); stages 1 and 3 add a
    residual block of two conv-BN-ReLU. Global max-pool (a MaxPool2D whose window is the last
    stage's whole map, H//8 x W//8: 4x4 for 32x32 images; at least 8x8), one Dense layer.
    Measured here: the first stage at full 32x32 resolution (a 3->16 stem, then 16->32) trained
    1.5x slower per image for the same parameter count, so the stem convolution itself
    downsamples.
    """
    rng = rng if rng is not None else np.random.default_rng()
    w1, w2, w3 = widths

    def conv_bn(cin, cout, pool=False):
        conv = Conv2D(cin, cout, 3, padding=1, bias=False, rng=rng, dtype=dtype)
        return [conv] + ([MaxPool2D(2)] if pool else []) + [BatchNorm2D(cout, dtype=dtype), ReLU()]

    def residual(c):
        return Residual(conv_bn(c, c) + conv_bn(c, c))

    # the padded 3x3 convs keep the size; the three 2x2 pools each halve it, rounding down
    h, w = _image_size(image_size)
    final = (h // 8, w // 8)
    if min(final) < 1:
        raise ValueError(f"resnet-small needs larger images than {h}x{w}.")
    return Sequential(
        conv_bn(in_channels, w1, pool=True) + [residual(w1)]       # (w1, 16, 16) for 32x32
        + conv_bn(w1, w2, pool=True)                                # (w2, 8, 8)
        + conv_bn(w2, w3, pool=True) + [residual(w3)]               # (w3, 4, 4)
        + [MaxPool2D(final), Flatten(), Dense(w3, num_classes, rng=rng, dtype=dtype)])


def keras_dropout(num_classes=10, in_channels=3, rng=None, dtype=np.float32,
                  image_size=(150, 150), widths=(32, 64, 128)):
    """The dropout net of the Keras cats-vs-dogs tutorials for 150x150 images:
    Conv 32 - MaxPool - Conv 64 - MaxPool - Conv 128 - MaxPool - Flatten - Dense 512 -
    Dropout(0.5) - Dense, 3x3 valid convs, 2x2 pools, ReLU.

    Google's ML Practicum exercise "Cat vs. Dog Image Classification: Reducing Overfitting"
    (the convnet of part 1 with dropout before the classifier) has this layer list with
    widths (16, 32, 64) and one sigmoid output; pass widths=(16, 32, 64) for its sizes. The
    Dense layer's input is widths[2] * OH * OW for image_size (17x17 for 150x150, 2x2 for
    32x32; at least 22x22). The Dropout layer draws its masks from a Generator seeded from rng,
    so a seeded build drops the same units.
    """
    rng = rng if rng is not None else np.random.default_rng()
    d = dict(rng=rng, dtype=dtype)
    w1, w2, w3 = widths
    features = [
        Conv2D(in_channels, w1, 3, **d), ReLU(), MaxPool2D(2),     # (32, 74, 74) for 150x150
        Conv2D(w1, w2, 3, **d), ReLU(), MaxPool2D(2),              # (64, 36, 36)
        Conv2D(w2, w3, 3, **d), ReLU(), MaxPool2D(2),              # (128, 17, 17)
    ]
    oh, ow = _output_size(features, image_size, "keras-dropout")
    return Sequential(features + [
        Flatten(), Dense(w3 * oh * ow, 512, **d), ReLU(),
        Dropout(0.5, rng=np.random.default_rng(rng.integers(2**63))),
        Dense(512, num_classes, **d),
    ])


def basic_block(in_channels, out_channels, stride=1, rng=None, dtype=np.float32):
    """torchvision's BasicBlock (He et al., "Deep Residual Learning", 2015, figure 2):

        y = relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))

    3x3 convs without bias, conv1 of the given stride; downsample, a strided 1x1 conv and a
    BatchNorm, only where the shape changes (else the shortcut is x). Built as a Residual then a
    ReLU, with torchvision's parameter names: the Residual and its body are named "" (a layer
    named "" lends its names to its container), so the block's keys are conv1.weight,
    bn1.running_mean, ..., downsample.0.weight, downsample.1.bias.
    """
    d = dict(rng=rng, dtype=dtype)
    body = Sequential({
        "conv1": Conv2D(in_channels, out_channels, 3, stride, 1, bias=False, **d),
        "bn1": BatchNorm2D(out_channels, dtype=dtype), "relu": ReLU(),
        "conv2": Conv2D(out_channels, out_channels, 3, 1, 1, bias=False, **d),
        "bn2": BatchNorm2D(out_channels, dtype=dtype)})
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = Sequential([Conv2D(in_channels, out_channels, 1, stride, bias=False, **d),
                                 BatchNorm2D(out_channels, dtype=dtype)])
    return Sequential({"": Residual(body, downsample, names=("", "downsample")), "relu": ReLU()})


def resnet18(num_classes=1000, in_channels=3, rng=None, dtype=np.float32, image_size=(224, 224)):
    """torchvision's resnet18 (11,689,512 parameters for 1000 classes), its layers and
    parameter names (conv1.weight, layer1.0.bn1.running_mean, layer2.0.downsample.0.weight,
    fc.bias, ...), so torchvision's state dict loads as it is (minicnn.load_weights):

        conv 7x7/2 64 - BN - ReLU - max-pool 3x3/2 (padding 1)       (64, 56, 56) for 224x224
        layer1..layer4: two basic_blocks each, 64, 128, 256, 512 channels, the first block of
        layers 2-4 of stride 2                                       (512, 7, 7)
        global average pool - fc                                     (num_classes,)

    Any image size: the global pool takes the last map whole (7x7 for 224x224, 1x1 for
    32x32). Initialised as minicnn's layers are (PyTorch's default, not torchvision's Kaiming
    normal); for ImageNet training load the weights instead.
    """
    rng = rng if rng is not None else np.random.default_rng()
    _image_size(image_size)
    layers = {"conv1": Conv2D(in_channels, 64, 7, 2, 3, bias=False, rng=rng, dtype=dtype),
              "bn1": BatchNorm2D(64, dtype=dtype), "relu": ReLU(),
              "maxpool": MaxPool2D(3, 2, padding=1)}
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        stride = 1 if stage == 1 else 2
        layers[f"layer{stage}"] = Sequential([
            basic_block(channels, width, stride, rng, dtype),
            basic_block(width, width, 1, rng, dtype)])
        channels = width
    layers["avgpool"] = GlobalAveragePooling2D()
    layers["fc"] = Dense(512, num_classes, rng=rng, dtype=dtype)
    return Sequential(layers)


MODELS = {"keras-tutorial": keras_tutorial, "resnet-small": resnet_small,
          "keras-dropout": keras_dropout, "resnet18": resnet18}


def build_model(name, num_classes=10, rng=None, dtype=np.float32, image_size=(32, 32)):
    """The preset called name, for num_classes classes and images of image_size (H, W)."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
    return MODELS[name](num_classes=num_classes, rng=rng, dtype=dtype, image_size=image_size)
