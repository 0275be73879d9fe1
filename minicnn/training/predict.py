"""python -m minicnn.predict: the most likely classes of each image, with probabilities.

    python -m minicnn.predict --checkpoint runs/resnet-small/best.npz cat.jpg ship.png

Images of another size are resized to the model's input, and grayscale or RGBA images are
converted to RGB; both are noted in the output.
"""
import argparse

import numpy as np

from minicnn.datasets import loading as datasets
from minicnn.training.checkpoint import finite_logits, load_for_inference, predict_logits
from minicnn.training.cli import positive_int, run
from minicnn.ops import softmax


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minicnn.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .npz written by minicnn.train")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any Pillow format)")
    parser.add_argument("--top", type=positive_int, default=3, help="how many classes to show per image")
    parser.add_argument("--backend", default="numpy", help="numpy (CPU) or cupy (GPU)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _describe(path, size):
    """What conversion an image needs, as a note for the user ('' when none)."""
    with datasets.open_image(path) as image:           # DataError when it cannot be read
        mode, (w, h) = image.mode, image.size
    notes = []
    if mode != "RGB":
        notes.append(f"converted {mode} to RGB")
    if (h, w) != tuple(size):
        notes.append(f"resized {w}x{h} to {size[1]}x{size[0]}")
    return f" ({', '.join(notes)})" if notes else ""


def read_images(images, size):
    """-> (uint8 (N, 3, H, W) of the image files decoded at the model's size (H, W), a note for
    each: '' or the conversion it needed). DataError for an image that cannot be read."""
    notes = [_describe(path, size) for path in images]
    return np.stack([datasets.decode_image(path, size) for path in images]), notes


def predict(checkpoint, images, top=3, backend="numpy", batch_size=256):
    """-> [(path, note, [(class, probability), ...])] for each image, best first.

    The images, decoded to the model's small input size (uint8), go through the model
    batch_size at a time, so a long list needs the activations of one batch only."""
    net = load_for_inference(checkpoint, backend)
    batch, notes = read_images(images, net.size)
    logits = finite_logits(predict_logits(net.model, batch, net.mean, net.std, net.xp,
                                          batch_size=batch_size), checkpoint, net.classes)
    results = []
    for path, note, p in zip(images, notes, softmax(logits)):
        best = np.argsort(-p, kind="stable")[:max(1, top)]
        results.append((path, note, [(net.classes[k], float(p[k])) for k in best]))
    return results


def _main(argv):
    args = build_parser().parse_args(argv)
    for path, note, ranked in predict(args.checkpoint, args.images, args.top, args.backend):
        print(f"{path}{note}: " + " | ".join(f"{name} {prob:.3f}" for name, prob in ranked))
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one sentence on stderr for bad input."""
    return run(_main, argv)

