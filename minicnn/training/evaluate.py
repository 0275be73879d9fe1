"""python -m minicnn.evaluate: a checkpoint's accuracy, per-class F1 and confusion on a dataset.

    python -m minicnn.evaluate --checkpoint runs/resnet-small/best.npz --data cifar-10-binary.tar.gz
    python -m minicnn.evaluate --checkpoint best.npz --data my_images/ --json

With CIFAR-10 (archive or batch directory) the test split is used; with an image folder, its
test/ split if it has one, else every image in it. Folder names are matched to the checkpoint's
class names by name.
"""
import argparse
import json

import numpy as np

from minicnn.datasets import loading as datasets
from minicnn.training.checkpoint import finite_logits, load_for_inference, predict_logits
from minicnn.training.cli import positive_int, run
from minicnn.errors import DataError
from minicnn.training.metrics import classification_report, format_report


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minicnn.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .npz written by minicnn.train")
    parser.add_argument("--data", default=None, help="CIFAR-10 archive, batch directory or image "
                                                     "folder (default: download CIFAR-10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--backend", default="numpy", help="numpy (CPU) or cupy (GPU)")
    parser.add_argument("--batch-size", type=positive_int, default=500, help="images per forward pass")
    parser.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def relabel(labels, dataset_classes, model_classes):
    """Map a dataset's labels onto the model's class indices by class name."""
    unknown = [c for c in dataset_classes if c not in model_classes]
    if unknown:
        raise DataError(f"The data's class(es) {', '.join(unknown)} are not among the "
                        f"checkpoint's classes ({', '.join(model_classes)}).")
    mapping = np.array([model_classes.index(c) for c in dataset_classes], dtype=np.int64)
    return mapping[labels]


def evaluate(checkpoint, data=None, backend="numpy", batch_size=500, tta=False):
    """-> the classification report (dict) of checkpoint on data's test split (or all of it)."""
    net = load_for_inference(checkpoint, backend)
    ds = datasets.load_dataset(data, image_size=net.size)
    x, y, split = ((ds.x_test, ds.y_test, "test") if ds.x_test is not None
                   else (ds.x_train, ds.y_train, "all images"))
    y = relabel(y, ds.classes, net.classes)
    logits = finite_logits(predict_logits(net.model, x, net.mean, net.std, net.xp,
                                          batch_size=batch_size, tta=tta), checkpoint, net.classes)
    report = classification_report(logits, y, net.classes)
    report.update(split=split, checkpoint=str(checkpoint), tta=tta)
    return report


def _main(argv):
    args = build_parser().parse_args(argv)
    report = evaluate(args.checkpoint, args.data, args.backend, args.batch_size, args.tta)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.checkpoint} on {report['split']} ({report['num_samples']:,} images)")
        print(format_report(report))
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one sentence on stderr for bad input."""
    return run(_main, argv)

