"""The client: a LightningModule = multi-head network + MHMD loss + which parts train.

``MultiHeadClassifier`` trains standalone with a ``pl.Trainer`` or runs federated client updates with
``local_update`` (no Trainer); ``ArrayDataModule`` feeds in-memory image arrays with the paper's transforms.
"""
from .client import (LOSS_PARTS, TRAIN_PARTS, ClientUpdate, MultiHeadClassifier, NonFiniteLossError,
                     build_loss_config)
from .datamodule import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ArrayDataModule, ArrayDataset,
                         test_transform, train_transform)

__all__ = ["ArrayDataModule", "ArrayDataset", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN", "CIFAR10_STD",
           "ClientUpdate", "LOSS_PARTS", "MultiHeadClassifier", "NonFiniteLossError", "TRAIN_PARTS",
           "build_loss_config", "test_transform", "train_transform"]
