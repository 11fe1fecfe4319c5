"""Per-update time of ``MultiHeadClassifier.local_update`` against a bare PyTorch loop doing identical arithmetic.

One client update = load the global body in place, a fresh SGD (momentum 0.9, heads frozen), ``--steps`` steps over
pre-built batches of ``--batch-size`` images already on the device, then clones of the body state. The bare loop is the
floor: the same network class, loss, frozen heads (``requires_grad=False``), optimizer and in-place loading, with no
metrics (one ``.item()`` for the mean loss). ``local_update`` additionally records per-step metrics on the device
(loss parts, accuracy of every head, mean temperatures) and checks the loss for NaN/Inf once at the end.

The two variants run interleaved (A B, B A, ...) so a changing machine load hits both alike; the table gives the median
time of each, the median of the per-pair ratios, and the ratio of median process CPU times (less sensitive to other
processes competing for the cores).

    python benchmarks/client_update.py                      # MobileNet (K=100) and cnn4 (K=10), train_part body
    python benchmarks/client_update.py --repeats 5 --models mobilenet:100
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fl_sd.losses import MultiHeadLoss
from fl_sd.models import create_model
from lightning_modules import MultiHeadClassifier


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_update(net, loss_fn, batches, body_state, lr, momentum, body_params, body_refs):
    """The floor: in-place load, fresh SGD over the trainable body, plain steps, state clones."""
    with torch.no_grad():
        for key, value in body_state.items():
            body_refs[key].copy_(value)
    opt = torch.optim.SGD(body_params, lr=lr, momentum=momentum)
    net.train()
    losses = []
    for x, y in batches:
        loss = loss_fn(net(x), y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    opt.zero_grad(set_to_none=True)
    total = torch.stack(losses).double().mean().item()
    with torch.no_grad():
        state = {k: body_refs[k].detach().clone() for k in body_state}
    return state, total


def bench_model(name: str, k: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    module = MultiHeadClassifier(name, num_classes=k, train_part=args.train_part, lr=args.lr).to(device)
    net = create_model(name, num_classes=k).to(device)
    net.load_state_dict(module.net.state_dict())
    loss_fn = MultiHeadLoss(module.loss_fn.config)
    train_body = args.train_part in ("body", "full")
    train_head = args.train_part in ("head", "full")
    for p in net.body_parameters():
        p.requires_grad_(train_body)
    for p in net.head_parameters():
        p.requires_grad_(train_head)
    trainable = [p for p in net.parameters() if p.requires_grad]
    refs = net.state_dict(keep_vars=True)
    body_state = module.get_state("body")

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device),
                torch.randint(0, k, (args.batch_size,), generator=g).to(device)) for _ in range(args.steps)]

    def run_module():
        return module.local_update(batches, body_state=body_state).metrics["loss"]

    def run_bare():
        return bare_update(net, loss_fn, batches, body_state, args.lr, 0.9, trainable, refs)[1]

    variants = {"local_update": run_module, "bare": run_bare}
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    losses = {}
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[v] = variants[v]()
            sync(device)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    med = statistics.median
    return {
        "model": f"{name} (K={k})",
        "bare_ms": 1e3 * med(wall["bare"]),
        "module_ms": 1e3 * med(wall["local_update"]),
        "ratio_of_medians": med(wall["local_update"]) / med(wall["bare"]),
        "median_pair_ratio": med([a / b for a, b in zip(wall["local_update"], wall["bare"])]),
        "cpu_ratio": med(cpu["local_update"]) / med(cpu["bare"]),
        "loss_diff": abs(losses["local_update"] - losses["bare"]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilenet:100,cnn4:10", help="comma-separated name:K")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10, help="steps per update (10 = one epoch of 500 images)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train-part", default="body", choices=["body", "head", "full"])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {desc}; torch {torch.__version__}; batch {args.batch_size} x {args.steps} steps; "
          f"train_part {args.train_part}; warm-up {args.warmup}, repeats {args.repeats} (interleaved)\n")
    rows = []
    for spec in args.models.split(","):
        name, k = spec.split(":")
        rows.append(bench_model(name.strip(), int(k), args, device))
    print("| model | bare PyTorch loop (ms/update) | local_update (ms/update) | ratio of medians | median pair ratio "
          "| process CPU-time ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['bare_ms']:.1f} | {r['module_ms']:.1f} | {r['ratio_of_medians']:.3f} | "
              f"{r['median_pair_ratio']:.3f} | {r['cpu_ratio']:.3f} |")
    worst = max(r["loss_diff"] for r in rows)
    print(f"\nmax |mean loss(local_update) - mean loss(bare)| over models: {worst:.2e} (identical arithmetic)")


if __name__ == "__main__":
    main()
