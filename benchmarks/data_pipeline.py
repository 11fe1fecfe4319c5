"""Images per second of the training-batch pipeline: fl_sd's device-resident ``client_batches`` (augmentation on the
device) against torchvision DataLoaders with the paper's transforms (RandomCrop(32, padding=4) -> RandomHorizontalFlip
-> ToTensor -> Normalize) over the same uint8 images.

The work is the federated pattern: ``--clients`` clients of ``--per-client`` images each, one local epoch each, batch
``--batch-size``; every batch ends on ``--device``. The reference builds a new DataLoader per client (SPEC §8.1.13), so
the DataLoader rows do that; one row also keeps one long-lived DataLoader over all clients' images for comparison.

    python benchmarks/data_pipeline.py                        # cifar10_mini if present (else synthetic), auto device
    python benchmarks/data_pipeline.py --device cpu --threads 1 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from fl_sd.data import DeviceData, client_batches, load_dataset, make_partition, seeded_generator  # noqa: E402

CIFAR10_MINI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10_mini.npz")


class PILDataset(Dataset):
    """What torchvision's CIFAR10 does per item: uint8 HWC -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, transform):
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return self.transform(Image.fromarray(self.images[j])), int(self.labels[j])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def consume(batches, device: torch.device) -> int:
    n = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        n += y.shape[0]
    sync(device)
    return n


def run_ours(data: DeviceData, clients: list[np.ndarray], bs: int, device, round_idx: int, augment=True) -> int:
    n = 0
    for c, idx in enumerate(clients):
        n += consume(client_batches(data, idx, bs, 1, seeded_generator(0, round_idx, c), augment=augment), device)
    return n


def run_loader_per_client(ds, tf, clients, bs, workers, device) -> int:
    n = 0
    for idx in clients:
        loader = DataLoader(PILDataset(ds.train_images, ds.train_labels, idx, tf), batch_size=bs, shuffle=True,
                            num_workers=workers, pin_memory=device.type == "cuda")
        n += consume(loader, device)
    return n


def run_loader_once(loader, device) -> int:
    return consume(loader, device)


def measure(fn, repeats: int) -> tuple[float, int]:
    fn(0)  # warm-up (allocations, worker imports, CUDA context)
    times, n = [], 0
    for r in range(repeats):
        t = time.perf_counter()
        n = fn(r + 1)
        times.append(time.perf_counter() - t)
    return min(times), n  # best of: the machine is shared, the minimum is the least disturbed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default="cifar10_mini" if os.path.isfile(CIFAR10_MINI) else "synthetic",
                    choices=["cifar10_mini", "synthetic"])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-client", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.data == "cifar10_mini":
        ds = load_dataset("npz", path=CIFAR10_MINI, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    else:
        ds = load_dataset("synthetic", num_classes=10, train_per_class=600, test_per_class=100)
    need = args.clients * args.per_client
    if need > len(ds.train_labels):
        raise SystemExit(f"--clients x --per-client = {need} > {len(ds.train_labels)} training images")
    part = make_partition("iid", ds.train_labels[:need], ds.test_labels, args.clients, seed=0)
    clients = part.train
    data = DeviceData.from_dataset(ds, "train", device)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
    tf_eval = transforms.Compose([transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
    bs = args.batch_size

    rows = []
    t, n = measure(lambda r: run_ours(data, clients, bs, device, r), args.repeats)
    rows.append(("fl_sd `client_batches` (augment on device)", t, n))
    for w in args.workers:
        t, n = measure(lambda r, w=w: run_loader_per_client(ds, tf, clients, bs, w, device), args.repeats)
        rows.append((f"DataLoader per client, num_workers={w}", t, n))
    if any(w > 0 for w in args.workers):
        w = max(args.workers)
        loader = DataLoader(PILDataset(ds.train_images, ds.train_labels, np.concatenate(clients), tf), batch_size=bs,
                            shuffle=True, num_workers=w, persistent_workers=True, pin_memory=device.type == "cuda")
        t, n = measure(lambda r: run_loader_once(loader, device), args.repeats)
        rows.append((f"one persistent DataLoader, num_workers={w}", t, n))
    eval_idx = np.arange(len(ds.test_labels))
    test = DeviceData.from_dataset(ds, "test", device)
    t, n = measure(lambda r: consume(test.iterate(500), device), args.repeats)
    rows.append(("fl_sd `DeviceData.iterate` (eval, batch 500, no augment)", t, n))
    t, n = measure(lambda r: consume(DataLoader(PILDataset(ds.test_images, ds.test_labels, eval_idx, tf_eval),
                                                batch_size=500), device), args.repeats)
    rows.append(("DataLoader eval, num_workers=0, batch 500", t, n))

    base = rows[1][2] / rows[1][1] if len(rows) > 1 else None
    print(f"\ndata: {args.data} ({args.clients} clients x {args.per_client} images, batch {bs}, 1 epoch each); "
          f"device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"torch threads: {torch.get_num_threads()}; best of {args.repeats}\n")
    print("| pipeline | images | seconds | images/s | vs per-client DataLoader (first row) |")
    print("|---|---:|---:|---:|---:|")
    for name, t, n in rows:
        rel = f"{(n / t) / base:.1f}x" if base and "eval" not in name else ""
        print(f"| {name} | {n} | {t:.3f} | {n / t:,.0f} | {rel} |")
    if len(rows) >= 2:
        speedup = (rows[-2][2] / rows[-2][1]) / (rows[-1][2] / rows[-1][1])
        print(f"\neval speed-up (iterate vs DataLoader): {speedup:.1f}x")


if __name__ == "__main__":
    main()
