"""Data: sources, a uint8 tensor cache, and Section 4.1's augmentation on the device.

    data = open_data(cfg.data, device)
    for x, y in data.train_batches(epoch, batch_size, seed): ...
    for x, y in data.eval_batches(batch_size): ...   # validation: steers training
    for x, y in data.test_batches(batch_size): ...   # held-out (test_size > 0): once, at the end

Modules: ``loader`` (open_data, the in-memory path), ``stream`` (the DataLoader path),
``synthetic`` / ``cifar`` / ``folder`` (sources), ``split``, ``stats``, ``augment``, ``cache``.
"""

from alexnet.data.base import Data, epoch_seed
from alexnet.data.loader import open_data
from alexnet.data.stats import Stats

__all__ = ["Data", "Stats", "epoch_seed", "open_data"]
