"""Train convnet4 (ReLU, LRN) on real CIFAR-10 images and print accuracy per epoch.

    python benchmarks/convnet4_cifar.py --data-root path/to/cifar10 [--epochs 12] [--device auto]

The data root holds train/<class>/*.jpg; 10% of it is carved off (stratified, seeded) as
the validation split. The recipe is the cifar profile's: SGD momentum 0.9, weight decay
5e-4, lr 0.01 divided by 10 on a validation plateau, padded random crops, flips and PCA
lighting. Ends with the line `best validation accuracy: NN.N% at epoch N`.
"""

from __future__ import annotations

import argparse
import time

import torch

from alexnet.config import build_config
from alexnet.train import train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--width", type=float, default=1.0)
    args = parser.parse_args()

    cfg = build_config("cifar", {
        "model.name": "convnet4", "model.activation": "relu", "model.norm": "lrn",
        "model.dropout": 0.0, "model.width": args.width,
        "data.source": "imagefolder", "data.root": args.data_root,
        "train.epochs": args.epochs, "runtime.device": args.device})
    start = time.perf_counter()

    def show(m):
        print(f"epoch {m.epoch:3d}  train err {100 * m.train_error:5.1f}%  val acc "
              f"{100 * (1 - m.val_error):5.1f}%  lr {m.lr:.4g}  {m.epoch_seconds:6.1f} s  "
              f"{m.images_per_second:7.0f} img/s  ({time.perf_counter() - start:6.0f} s total)",
              flush=True)

    result = train_run(cfg, on_epoch=show)
    best = min(result.history, key=lambda h: h.val_error)
    print(f"device: {result.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"wall time: {time.perf_counter() - start:.0f} s for {len(result.history)} epochs")
    print(f"best validation accuracy: {100 * (1 - best.val_error):.1f}% at epoch {best.epoch}")


if __name__ == "__main__":
    main()
