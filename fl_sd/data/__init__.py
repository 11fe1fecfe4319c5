"""Data: sources (torchvision datasets, .npz arrays, synthetic), client partitions (shards, Dirichlet, IID) and
device-resident batches with on-device augmentation.

    ds = load_dataset("cifar100", root="data")                     # or ("npz", path=...), ("synthetic", num_classes=10)
    part = make_partition("shards", ds.train_labels, ds.test_labels, num_clients=100, seed=0, shards_per_client=10)
    train = DeviceData.from_dataset(ds, "train", device)
    for x, y in client_batches(train, part.train[i], 50, epochs=1, generator=seeded_generator(seed, rnd, i)): ...
"""
from .device import PADDING, DeviceData, client_batches, seeded_generator
from .partition import PARTITION_KINDS, Partition, make_partition
from .sources import (DATASET_NAMES, NORMALISATION, DataError, ImageDataset, channel_stats, load_dataset, load_npz,
                      make_synthetic, read_npz)

__all__ = [
    "DataError",
    "ImageDataset",
    "load_dataset",
    "load_npz",
    "read_npz",
    "channel_stats",
    "make_synthetic",
    "DATASET_NAMES",
    "NORMALISATION",
    "Partition",
    "make_partition",
    "PARTITION_KINDS",
    "DeviceData",
    "client_batches",
    "seeded_generator",
    "PADDING",
]
