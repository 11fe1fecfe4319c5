"""One evaluation of every head on the test set: fl-sd (``Federation.evaluate``: per-client scores, the learned
temperatures) against the floor, a bare loop ``net(x)`` + argmax of every head over the same images, at several
batch sizes. MobileNet on CIFAR-100-shaped synthetic data, 100 clients; BatchNorm with or without running statistics
(without: each client's split is evaluated as its own batch, as the reference, and the temperatures need their own
pass of the first 1000 images as one batch, timed apart as "of which temperatures", unless --temperature-pass
evaluation; the plain floors ignore both, the "split floor" is the bare loop over the client splits, the protocol's
own floor). fl-sd and the floors are interleaved in each repeat; the table gives medians. Results: docs/RESULTS.md, "Evaluation against its floor".

    OMP_NUM_THREADS=1 python benchmarks/evaluation.py --models cnn4 mobilenet --test-images 2000
    OMP_NUM_THREADS=1 python benchmarks/evaluation.py --models cnn4 mobilenet --test-images 10000
    OMP_NUM_THREADS=1 python benchmarks/evaluation.py --models cnn4 mobilenet --running-stats false \
        --batch-sizes 50 100 --temperature-pass evaluation
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.evaluation import batch_dependent, pass_images, temperature_stats  # noqa: E402
from orchestrator.federation import Federation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"mobilenet": 100, "cnn4": 10}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def floor(fed: Federation, batch_size: int) -> float:
    """A bare eval loop: every head's argmax over the whole test set in batches of ``batch_size``."""
    net, data = fed.runtime.net, fed.runtime.test_data
    fed.runtime.load(fed.server.global_state)
    net.eval()
    sync(fed.device)
    t0 = time.perf_counter()
    hits = torch.zeros((), device=fed.device)
    for x, y in data.iterate(batch_size):
        out = net(x)
        for logits in (out.final, *out.aux):
            hits += (logits.argmax(1) == y).sum()
    sync(fed.device)
    return time.perf_counter() - t0


@torch.no_grad()
def split_floor(fed: Federation) -> float:
    """The bare loop of the protocol for BatchNorm without running statistics: every client's test split as its own
    batch(es) of at most ``eval_batch_size``, every head's argmax (what fl-sd cannot go below without other numbers)."""
    net, data, runtime = fed.runtime.net, fed.runtime.test_data, fed.runtime
    runtime.load(fed.server.global_state)
    net.eval()
    splits = [runtime.test_split(c) for c in range(runtime.num_clients)]
    sync(fed.device)
    t0 = time.perf_counter()
    hits = torch.zeros((), device=fed.device)
    for ix in splits:
        for x, y in data.iterate(runtime.eval_batch_size, ix):
            out = net(x)
            for logits in (out.final, *out.aux):
                hits += (logits.argmax(1) == y).sum()
    sync(fed.device)
    return time.perf_counter() - t0


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet"], choices=sorted(CLASSES))
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[25, 50, 100, 500])
    parser.add_argument("--running-stats", nargs="+", default=["false", "true"], choices=["false", "true"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--floor-only", action="store_true", help="time only the bare loops (choosing a batch size)")
    parser.add_argument("--temperature-pass", default="reference", choices=["reference", "evaluation"],
                        help="federation.temperature_pass (evaluation: no extra pass for batch-dependent BatchNorm)")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        k = CLASSES[model]
        for stats in args.running_stats:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(REPO / "configs" / "smoke.yaml", [
                    "--run_dir", tmp, "--device", args.device, "--model.name", model,
                    "--model.options", f"{{track_running_stats: {stats}}}", "--algorithm.name", "mhmd",
                    "--data.partition", "iid", "--data.num_clients", "100",
                    "--data.synthetic", f"{{num_classes: {k}, train_per_class: {max(1, 1000 // k)}, "
                                        f"test_per_class: {args.test_images // k}}}",
                    "--tracking.progress", "false", "--tracking.wandb", "disabled",
                    "--federation.temperature_pass", args.temperature_pass])
                fed = Federation(cfg, tmp, log=lambda *_: None)
                if args.floor_only:  # warm-up
                    floor(fed, args.batch_sizes[0])
                else:
                    fed.evaluate()
                ours, temps, floors, splits = [], [], {b: [] for b in args.batch_sizes}, []
                dependent = batch_dependent(fed.runtime.net)  # each client's split its own batch
                own_pass = dependent and args.temperature_pass == "reference"  # the temperatures' own pass
                for _ in range(args.repeats):  # interleaved
                    ours.append(float("nan") if args.floor_only else timed(fed.evaluate, fed.device))
                    if own_pass and not args.floor_only:
                        temps.append(timed(lambda: temperature_stats(fed.runtime, fed.server.global_state),
                                           fed.device))
                    for b in args.batch_sizes:
                        floors[b].append(floor(fed, b))
                    if dependent:
                        splits.append(split_floor(fed))
                medians = {b: statistics.median(v) for b, v in floors.items()}
                best_b = min(args.batch_sizes, key=medians.get)
                rows.append((model, stats, str(fed.device),
                             pass_images(cfg.federation.eval_batch_size, fed.device), statistics.median(ours),
                             f"{statistics.median(temps):.2f}" if temps else "in the pass", medians, best_b,
                             statistics.median(splits) if splits else None))
    print(f"\nthreads {torch.get_num_threads()}, {args.test_images} test images, 100 clients, median of "
          f"{args.repeats}\n")
    sizes = " | ".join(f"floor b={b} s" for b in args.batch_sizes)
    print(f"temperature_pass {args.temperature_pass}\n")
    print(f"| model | BN running stats | device | fl-sd pass images | fl-sd evaluate s | of which temperatures s | "
          f"{sizes} | fl-sd / best floor | split floor s | fl-sd / split floor |")
    print("|---" * (9 + len(args.batch_sizes)) + "|")
    for model, stats, dev, images, ours, temp, floors, best_b, split in rows:
        cells = " | ".join(f"{floors[b]:.2f}" for b in args.batch_sizes)
        tail = f"{split:.2f} | {ours / split:.2f}" if split else "- | -"
        print(f"| {model} | {stats} | {dev} | {images} | {ours:.2f} | {temp} | {cells} | "
              f"{ours / floors[best_b]:.2f} (b={best_b}) | {tail} |")


if __name__ == "__main__":
    main()
