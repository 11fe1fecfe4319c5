"""One file per client: the data a SuperNode of Flower's deployment runtime holds, and nothing of the others'.

``python -m orchestrator.shards --config CONFIG [overrides...] --out DIR`` partitions the dataset exactly as a run
of that config does (same seed, same partition) and writes ``DIR/client_<c>.npz`` for every client: its own training
and test images and labels (in the order of its index sets), the dataset's normalisation, the number of clients and
a digest of the client's index sets. Copy ``client_<c>.npz`` to the machine of client c's SuperNode and start it with
``--node-config 'partition-id=<c> data-path="/path/client_<c>.npz"'`` (docs/flower.md).

On the node, :func:`load_shard` + :func:`shard_runtime` give a :class:`~orchestrator.clients.ClientRuntime` that holds
only that client's samples: the same batches, augmentation and updates as the full runtime gives for that client
(batch streams draw positions within the client's index set, seeded by (seed, round, client)). The ServerApp sends the
digest it expects with every job, so a node started with another config's shard is refused with a clear error.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl_sd.data import DataError, ImageDataset, Partition, read_npz
from fl_sd.io import atomic_write

from .algorithms import Algorithm
from .build import client_partition, load_data
from .clients import ClientRuntime
from .config import Config, load_config
from .errors import ConfigError

FORMAT_VERSION = 1
#: the arrays of a shard file
SHARD_KEYS = ("format_version", "client", "num_clients", "digest", "name", "num_classes", "mean", "std",
              "train_images", "train_labels", "test_images", "test_labels")


def shard_file(client: int) -> str:
    return f"client_{client}.npz"


def shard_digest(partition: Partition, client: int) -> str:
    """What identifies client ``client``'s data: its train/test index sets and the number of clients."""
    h = hashlib.sha256(f"{partition.num_clients}:{client}:".encode())
    h.update(np.ascontiguousarray(partition.train[client], dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(partition.test[client], dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


@dataclass
class Shard:
    """One client's data as a SuperNode holds it."""

    client: int
    num_clients: int
    digest: str
    dataset: ImageDataset  # only this client's samples


def export_shards(cfg: Config, out_dir: str | Path, partition: Partition | None = None) -> list[Path]:
    """Write every client's shard under ``out_dir``; returns the files in client order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_data(cfg)
    partition = partition or client_partition(cfg, dataset)
    files = []
    for c in range(partition.num_clients):
        tr, te = partition.train[c], partition.test[c]
        arrays = {"format_version": np.int64(FORMAT_VERSION), "client": np.int64(c),
                  "num_clients": np.int64(partition.num_clients), "digest": np.array(shard_digest(partition, c)),
                  "name": np.array(dataset.name), "num_classes": np.int64(dataset.num_classes),
                  "mean": np.asarray(dataset.mean, dtype=np.float64), "std": np.asarray(dataset.std, dtype=np.float64),
                  "train_images": dataset.train_images[tr], "train_labels": dataset.train_labels[tr],
                  "test_images": dataset.test_images[te], "test_labels": dataset.test_labels[te]}
        path = out_dir / shard_file(c)
        atomic_write(path, lambda fh, arrays=arrays: np.savez(fh, **arrays))
        files.append(path)
    return files


def load_shard(path: str | Path) -> Shard:
    z = read_npz(path, SHARD_KEYS, "client data", remake="export it again",
                 where="export it with python -m orchestrator.shards --config CONFIG --out DIR and pass "
                       "data-path=\"DIR/client_<c>.npz\" in --node-config")
    version = int(z["format_version"])
    if version != FORMAT_VERSION:
        raise DataError(f"client data {str(path)!r}: format version {version}, this fl-sd reads {FORMAT_VERSION}; "
                        "fix: export it again")
    try:
        dataset = ImageDataset(name=str(z["name"]), train_images=z["train_images"],
                               train_labels=z["train_labels"].astype(np.int64), test_images=z["test_images"],
                               test_labels=z["test_labels"].astype(np.int64), num_classes=int(z["num_classes"]),
                               mean=tuple(float(v) for v in z["mean"]), std=tuple(float(v) for v in z["std"]))
        return Shard(int(z["client"]), int(z["num_clients"]), str(z["digest"]), dataset)
    except (TypeError, ValueError) as err:
        raise DataError(f"client data {str(path)!r} is not an fl-sd client shard ({err}); fix: export it again") from None


def shard_runtime(cfg: Config, algorithm: Algorithm, shard: Shard, device: torch.device) -> ClientRuntime:
    """A ClientRuntime holding only ``shard``'s client's samples (the other clients' index sets are empty)."""
    empty = np.zeros(0, dtype=np.int64)
    train = [empty] * shard.num_clients
    test = [empty] * shard.num_clients
    train[shard.client] = np.arange(len(shard.dataset.train_labels), dtype=np.int64)
    test[shard.client] = np.arange(len(shard.dataset.test_labels), dtype=np.int64)
    return ClientRuntime(cfg, algorithm, shard.dataset, Partition(train, test), device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.shards",
                                     description="Write one data file per client for Flower SuperNodes.")
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--out", required=True, help="directory for client_<c>.npz")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        files = export_shards(cfg, args.out)
    except (ConfigError, DataError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, as fl-sd's own command
        return 2
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
