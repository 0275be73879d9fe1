"""python -m minicnn.predict: the most likely classes of each image, with probabilities.

    python -m minicnn.predict --checkpoint runs/resnet-small/best.npz cat.jpg ship.png

Images of another size are resized to the model's input, and grayscale or RGBA images are
converted to RGB; both are noted in the output.
"""
import argparse
import sys

import numpy as np
from PIL import Image

from minicnn import data as datasets
from minicnn.backend import to_numpy
from minicnn.checkpoint import load_for_inference
from minicnn.cli import positive_int, run
from minicnn.errors import DataError
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
    try:
        with Image.open(path) as image:
            mode, (w, h) = image.mode, image.size
    except (OSError, SyntaxError, ValueError):
        raise DataError(f"Cannot read {path} as an image.") from None
    notes = []
    if mode != "RGB":
        notes.append(f"converted {mode} to RGB")
    if (h, w) != tuple(size):
        notes.append(f"resized {w}x{h} to {size[1]}x{size[0]}")
    return f" ({', '.join(notes)})" if notes else ""


def predict(checkpoint, images, top=3, backend="numpy"):
    """-> [(path, note, [(class, probability), ...])] for each image, best first."""
    net = load_for_inference(checkpoint, backend)
    notes = [_describe(path, net.size) for path in images]
    batch = np.stack([datasets.decode_image(path, net.size) for path in images])   # (N, 3, H, W)
    probs = to_numpy(softmax(net.model.forward(datasets.normalize(batch, net.mean, net.std,
                                                                  net.xp))))
    results = []
    for path, note, p in zip(images, notes, probs):
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


if __name__ == "__main__":
    sys.exit(main())
