"""Transfer learning on CIFAR-10: a base trained on 8 classes, moved to the 2 it never saw.

    python examples/transfer_learning.py [--cifar /tmp/cifar/cifar10-train] [--work DIR]

The data is CIFAR-10 as an image folder, one folder of JPEGs per class (the 50,000 training
images). The script links files from it into DIR (no copies):

    DIR/base/train/<8 classes>/   --base-images a class   the base's data: every class but
    DIR/base/test/<8 classes>/    250 a class               ship and truck
    DIR/new/train/{ship,truck}/   --new-images a class     the new task: a small folder
    DIR/new/test/{ship,truck}/    1000 a class              its validation images, apart

then
  1. trains the keras-tutorial CNN on the base data with python -m minicnn.train's fit (its
     checkpoint is DIR/runs/base/best.npz; a second run of the script reuses it);
  2. loads the base, swaps its last Dense for a fresh 2-class head (replace_head), freezes the
     rest (freeze) and trains the head; then unfreezes and fine-tunes everything with Adam at a
     tenth of the rate, printing the validation accuracy before (fresh head), after the head
     training and after fine-tuning;
  3. trains the same CNN from scratch on the same 400 images for as many epochs, for comparison.
The numbers measured here, and the same flow on the command line and for torchvision's
ImageNet ResNet-18, are in docs/transfer.md.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

import minicnn
from minicnn.datasets import loading as datasets
from minicnn.nn import freeze, replace_head, unfreeze
from minicnn.nn.optim import Adam
from minicnn.nn.zoo import keras_tutorial
from minicnn.training import trainer
from minicnn.training.checkpoint import load_checkpoint

NEW_CLASSES = ("ship", "truck")
BASE_TEST, NEW_TEST = 250, 1000            # validation images a class


def link_folders(cifar, work, base_images, new_images, seed=0):
    """Link a seeded random choice of each class's files into work's base/ and new/ folders
    (train and test parts disjoint); a folder that holds as many files is kept as it is."""
    rng = np.random.default_rng(seed)
    for name in sorted(os.listdir(cifar)):
        files = sorted(os.listdir(cifar / name))
        order = [files[i] for i in rng.permutation(len(files))]
        task, n_train, n_test = (("new", new_images, NEW_TEST) if name in NEW_CLASSES
                                 else ("base", base_images, BASE_TEST))
        if n_train + n_test > len(files):
            sys.exit(f"{cifar / name} has {len(files)} images, fewer than the {n_train + n_test} "
                     f"asked for.")
        for split, chosen in (("train", order[:n_train]),
                              ("test", order[n_train:n_train + n_test])):
            folder = work / task / split / name
            if folder.is_dir() and len(os.listdir(folder)) == len(chosen):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                target = folder / f
                if not target.exists():
                    target.symlink_to(cifar / name / f)


def accuracy(model, x, y):
    return model.evaluate(x, y, batch_size=500, return_dict=True)["accuracy"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", type=Path, default=Path("/tmp/cifar/cifar10-train"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/minicnn-transfer"))
    parser.add_argument("--base-images", type=int, default=3000, help="a class, for the base")
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--new-images", type=int, default=200, help="a class, for the new task")
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0,
                        help="of the new head, the scratch net and the batch order (the images "
                             "and the base always use seed 0)")
    args = parser.parse_args(argv)
    if not args.cifar.is_dir():
        sys.exit(f"{args.cifar} is not a folder of CIFAR-10 class folders; give --cifar.")
    work = args.work.absolute()
    link_folders(args.cifar, work, args.base_images, args.new_images)

    # 1. The base: the keras-tutorial recipe (Adam 1e-3, cosine, flips) on 8 classes.
    base_run = work / "runs" / "base"
    if not (base_run / "best.npz").exists():
        trainer.fit(data=str(work / "base"), model="keras-tutorial", epochs=args.base_epochs,
                    out=str(base_run), seed=0, force=True)
    base = minicnn.load(base_run / "best.npz")
    info = load_checkpoint(base_run / "best.npz")[1]
    mean, std = np.array(info["norm"]["mean"]), np.array(info["norm"]["std"])
    print(f"base: {base_run / 'best.npz'}, validation accuracy on its 8 classes "
          f"{info['best_val_acc']:.4f}")

    # The new task's images, normalised with the base's statistics (what its filters expect).
    new = datasets.load_dataset(str(work / "new"))
    x_train, x_val = (datasets.normalize(x, mean, std) for x in (new.x_train, new.x_test))
    y_train, y_val = new.y_train, new.y_test
    print(f"new task: {list(new.classes)}, {len(y_train)} training and {len(y_val)} "
          f"validation images")

    # 2. A fresh head, the rest frozen: only the head learns.
    rng = np.random.default_rng(args.seed)
    replace_head(base, len(new.classes), rng=rng)
    freeze(base, up_to=-2)                         # every layer but the last (the new head)
    base.compile(Adam(1e-3), metrics=["accuracy"])
    before = accuracy(base, x_val, y_val)
    base.fit(x_train, y_train, batch_size=32, epochs=args.head_epochs, seed=args.seed, verbose=0)
    after_head = accuracy(base, x_val, y_val)
    # Then everything, at a tenth of the rate, with a fresh optimiser (Keras's guide recompiles).
    unfreeze(base)
    base.compile(Adam(1e-4), metrics=["accuracy"])
    base.fit(x_train, y_train, batch_size=32, epochs=args.fine_tune_epochs, seed=args.seed,
             verbose=0)
    after_fine_tune = accuracy(base, x_val, y_val)

    # 3. The same CNN from scratch on the same images, normalised with their own statistics.
    own_mean, own_std = datasets.channel_stats(new.x_train)
    scratch = keras_tutorial(num_classes=len(new.classes), rng=np.random.default_rng(args.seed))
    scratch.compile(Adam(1e-3), metrics=["accuracy"])
    scratch.fit(datasets.normalize(new.x_train, own_mean, own_std), y_train, batch_size=32,
                epochs=args.head_epochs + args.fine_tune_epochs, seed=args.seed, verbose=0)
    from_scratch = accuracy(scratch, datasets.normalize(new.x_test, own_mean, own_std), y_val)

    print(f"\nvalidation accuracy on {len(y_val)} images of {' vs '.join(new.classes)}:")
    print(f"  pretrained base, fresh head (before training)   {before:.4f}")
    print(f"  after {args.head_epochs} epochs of the head alone (base frozen)  {after_head:.4f}")
    print(f"  after {args.fine_tune_epochs} more epochs fine-tuning everything  "
          f"{after_fine_tune:.4f}")
    print(f"  from scratch, {args.head_epochs + args.fine_tune_epochs} epochs on the same "
          f"images          {from_scratch:.4f}")


if __name__ == "__main__":
    main()
