"""A small LightningDataModule over in-memory image arrays, with the paper's CIFAR transforms (SPEC 6.1).

This is the path for users training :class:`~lightning_modules.client.MultiHeadClassifier` with a ``pl.Trainer``.
The federated path does not use it: it builds device-resident batches with on-device augmentation (``fl_sd.data``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fl_sd.data import NORMALISATION, load_npz

#: Normalisation constants of the reference (SPEC 6.1; one place: ``fl_sd.data.NORMALISATION``). CIFAR-10 uses
#: ImageNet's.
CIFAR10_MEAN, CIFAR10_STD = NORMALISATION["cifar10"]
CIFAR100_MEAN, CIFAR100_STD = NORMALISATION["cifar100"]


def train_transform(mean: Sequence[float], std: Sequence[float], size: int = 32, augment: bool = True):
    """RandomCrop(size, padding=4) -> RandomHorizontalFlip -> ToTensor -> Normalize (the reference's train transform).

    ToTensor is applied first so the crop/flip run on the tensor; the values are identical (zero padding either way).
    """
    steps = [transforms.ToTensor()]
    if augment:
        steps += [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()]
    steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def test_transform(mean: Sequence[float], std: Sequence[float]):
    """ToTensor -> Normalize."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


class ArrayDataset(Dataset):
    """(image, label) pairs from a uint8 ``(N, H, W, C)`` or ``(N, H, W)`` array and an integer label array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim == 3:  # grayscale (N, H, W)
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be 1-D with one label per image, got {labels.shape} "
                             f"for {len(images)} images")
        self.images = images
        self.labels = torch.as_tensor(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        x = self.transform(image) if self.transform is not None else torch.from_numpy(image).permute(2, 0, 1)
        return x, self.labels[index]


class ArrayDataModule(pl.LightningDataModule):
    """Train/test arrays in memory -> DataLoaders with the paper's transforms. The test set doubles as validation set.

    Args:
        train_images, test_images: uint8 ``(N, H, W, C)`` (HWC, as torchvision's CIFAR ``.data``) or ``(N, H, W)``.
        train_labels, test_labels: integer class labels.
        mean, std: per-channel normalisation constants (e.g. :data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`).
        batch_size: training batch size (the reference: 50). eval_batch_size: validation/test batch size.
        augment: random crop with 4-pixel zero padding + horizontal flip on the training set.
        num_workers: DataLoader workers.
    """

    def __init__(self, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, mean: Sequence[float], std: Sequence[float], batch_size: int = 50,
                 eval_batch_size: int = 500, augment: bool = True, num_workers: int = 0):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {eval_batch_size}")
        size = int(np.asarray(train_images).shape[1])
        self.train_set = ArrayDataset(train_images, train_labels, train_transform(mean, std, size, augment))
        self.test_set = ArrayDataset(test_images, test_labels, test_transform(mean, std))
        channels = self.train_set.images.shape[-1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), got {len(mean)}/{len(std)}")
        self.num_classes = int(max(self.train_set.labels.max(), self.test_set.labels.max())) + 1
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers

    @classmethod
    def from_npz(cls, path: str | Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 **kwargs) -> "ArrayDataModule":
        """Read an ``.npz`` with ``train_images``, ``train_labels``, ``test_images``, ``test_labels`` (HWC uint8), as
        ``../shared/data/cifar10_mini.npz``, with :func:`fl_sd.data.load_npz` (a bad file raises
        :class:`fl_sd.data.DataError`). ``mean``/``std`` default to the per-channel statistics of the training
        images (:func:`fl_sd.data.channel_stats`, as the federated npz source); pass :data:`CIFAR10_MEAN` /
        :data:`CIFAR10_STD` (or the CIFAR-100 ones) for the reference's constants."""
        ds = load_npz(path)  # the federated npz source's loader: same checks, same channel statistics
        arrays = {"train_images": ds.train_images, "train_labels": ds.train_labels, "test_images": ds.test_images,
                  "test_labels": ds.test_labels}
        mean = ds.mean if mean is None else mean
        std = ds.std if std is None else std
        return cls(**arrays, mean=mean, std=std, **kwargs)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)
