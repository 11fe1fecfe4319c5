"""Seconds per federated round: the orchestrator (Federation.run_round through the client LightningModule) against a
bare-PyTorch floor doing the same arithmetic (same model, same device-resident batches, same SGD steps, same
weighted averaging), for MobileNet (CIFAR-100 shape) and the 4-conv CNN (CIFAR-10 shape).

    python benchmarks/round_time.py                       # CPU (or CUDA when present), 10 clients x 10 steps x 50
    python benchmarks/round_time.py --models cnn4 --rounds 5 --device cpu

The reference code on a 2-core CPU (SPEC): 29.6 s per round for MobileNet, 10.4 s for the 4-conv CNN.
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

from fl_sd.losses import MultiHeadLoss  # noqa: E402
from orchestrator.aggregation import WeightedMean  # noqa: E402
from orchestrator.backends import InProcessBackend  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.federation import Federation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # model -> (classes, per-class train images so that 10 clients hold 500 each)
    "mobilenet": 100,
    "cnn4": 10,
}


def build(model: str, device: str, run_dir: str) -> Federation:
    k = SETTINGS[model]
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        "--run_dir", run_dir, "--device", device, "--model.name", model, "--model.options", "{}",
        "--algorithm.name", "mhmd",
        "--data.synthetic", f"{{num_classes: {k}, train_per_class: {5000 // k}, test_per_class: {1000 // k}}}",
        "--data.partition", "iid", "--data.num_clients", "10", "--federation.client_fraction", "1.0",
        "--federation.local_epochs", "1", "--federation.batch_size", "50", "--federation.lr", "0.1",
        "--federation.rounds", "1000"])
    return Federation(cfg, run_dir)


def floor_round(fed: Federation, round_idx: int) -> None:
    """The same arithmetic as one round, written as a bare loop."""
    rt, g = fed.runtime, fed.server.global_state
    net = rt.net
    loss_fn = MultiHeadLoss(rt.train_loss)
    lr = fed.lr(round_idx)
    agg = WeightedMean()
    body = set(rt.body_keys)
    for p in net.head_parameters():
        p.requires_grad_(False)
    for client in fed.sample_clients(round_idx).tolist():
        rt.load(g)
        net.train()
        opt = torch.optim.SGD([p for p in net.body_parameters()], lr=lr, momentum=fed.cfg.federation.momentum,
                              weight_decay=fed.cfg.federation.weight_decay)
        for x, y in rt.batches(client, round_idx, fed.cfg.federation.local_epochs):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).total.backward()
            opt.step()
        agg.add({k: v for k, v in net.state_dict().items() if k in body}, float(rt.num_train_samples(client)))
    for k, v in agg.result().items():
        g[k].copy_(v)
    for p in net.head_parameters():
        p.requires_grad_(True)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet", "cnn4"], choices=sorted(SETTINGS))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (after 1 warm-up)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            fed = build(model, args.device, tmp)
            backend = InProcessBackend(fed.runtime, fed.algorithm)
            fed.run_round(backend)  # warm-up
            floor_round(fed, 1)
            ours, floor = [], []
            for r in range(args.rounds):  # interleave the two to share any drift of the machine
                ours.append(timed(lambda: fed.run_round(backend), fed.device))
                floor.append(timed(lambda: floor_round(fed, 2 + r), fed.device))
            o, f = statistics.median(ours), statistics.median(floor)
            rows.append((model, str(fed.device), o, f, o / f))
    print(f"\nthreads: {torch.get_num_threads()}, 10 clients x 10 steps x batch 50 per round, median of {args.rounds}\n")
    print("| model | device | fl-sd s/round | bare-loop floor s/round | ratio |")
    print("|---|---|---|---|---|")
    for model, dev, o, f, ratio in rows:
        print(f"| {model} | {dev} | {o:.2f} | {f:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
