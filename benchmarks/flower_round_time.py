"""Seconds per federated round: the Flower backend (Flower's simulation engine on Ray) and Flower's deployment runtime
(SuperLink + SuperNodes + ``flwr run``, on loopback) vs the in-process backend, CPU.

    WANDB_MODE=disabled python benchmarks/flower_round_time.py [--rounds 5] [--num-cpus 1] [--settings smoke cifar]
        [--deployment smoke3] [--insecure]

Settings (both synthetic, so nothing is downloaded):

* ``smoke``: configs/smoke.yaml -- cnn4 of width 16, 10 clients of ~100 CIFAR-shaped images, 5 clients a round, 2 steps each.
* ``cifar``: cnn4 on CIFAR-shaped data with the paper's client size -- 10 clients of 500 images, all 10 every round,
  10 steps of batch 50 each (tau = 1).
* ``smoke3``: configs/smoke.yaml on 3 clients (IID), 2 a round: small enough for one SuperNode per client here.

``--deployment SETTING...`` adds, for each of those settings, a run on Flower's deployment runtime
(deploy/local_federation.py: TLS + SuperNode authentication, or ``--insecure``; one SuperNode per client, each with
its exported shard): ``start`` is the SuperLink and SuperNodes coming up plus everything of ``flwr run`` that is not a
round (submitting the app, the ServerApp process and its data, node discovery, the final evaluation, the end of the
run); the round times are the ServerApp's own (``rounds.csv``), the first of ``--rounds`` + 1 reported apart.

For each setting and backend the same Federation runs ``--rounds`` timed rounds (``Federation.run_round``: local
updates + aggregation, no evaluation) after one untimed warm-up round; the Flower backend's start (Ray, actors, node
discovery) and its first round (each Ray actor rebuilds the run's data and model once) are reported separately. The
in-process backend runs with each of ``--threads`` torch thread counts (default 1 and torch's default, i.e. all cores);
each Flower client gets ``--num-cpus`` CPUs (Flower starts floor(cores / num_cpus) Ray actors, each with that many torch
threads, so clients of a round train in parallel). The ratio column compares with the first in-process row. Prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from orchestrator.backends import InProcessBackend  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.federation import Federation  # noqa: E402

QUIET = ["--tracking.progress", "false", "--tracking.wandb", "disabled", "--tracking.plots", "false"]
SETTINGS = {
    "smoke": [],
    "cifar": ["--data.synthetic", '{"num_classes": 10, "train_per_class": 500, "test_per_class": 100}',
              "--data.shards_per_client", "2", "--federation.client_fraction", "1.0", "--model.options", "{}"],
    "smoke3": ["--data.num_clients", "3", "--data.partition", "iid", "--federation.client_fraction", "0.67"],
}


def make_fed(setting: str, run_dir: Path, *extra: str) -> Federation:
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["--run_dir", str(run_dir), "--device", "cpu", *QUIET,
                                                         *SETTINGS[setting], *extra])
    return Federation(cfg, run_dir, log=lambda *a, **k: None)


def time_rounds(fed: Federation, backend, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fed.run_round(backend)
        times.append(time.perf_counter() - t0)
    return times


def bench(setting: str, rounds: int, num_cpus: float, threads: list[int], root: Path) -> list[dict]:
    rows = []
    default_threads = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        fed = make_fed(setting, root / f"{setting}-inprocess-{n}")
        backend = InProcessBackend(fed.runtime, fed.algorithm)
        first = time_rounds(fed, backend, 1)[0]
        steady = time_rounds(fed, backend, rounds)
        rows.append({"setting": setting, "backend": f"inprocess ({n} torch thread{'s' if n > 1 else ''})",
                     "clients": fed.cfg.clients_per_round, "start": 0.0, "first": first, "steady": steady})
    torch.set_num_threads(default_threads)

    from orchestrator.flower_backend import FlowerBackend

    fed = make_fed(setting, root / f"{setting}-flower", "--backend", "flower", "--flower.num_cpus", str(num_cpus))
    t0 = time.perf_counter()
    backend = FlowerBackend(fed.cfg, fed.run_dir, fed.runtime)
    start = time.perf_counter() - t0
    try:
        first = time_rounds(fed, backend, 1)[0]
        steady = time_rounds(fed, backend, rounds)
    finally:
        backend.close()
    rows.append({"setting": setting, "backend": f"flower (num_cpus {num_cpus:g})", "clients": fed.cfg.clients_per_round,
                 "start": start, "first": first, "steady": steady})
    return rows


def bench_deployment(setting: str, rounds: int, root: Path, secure: bool) -> dict:
    sys.path.insert(0, str(REPO / "deploy"))
    import csv

    from local_federation import LocalFederation

    from orchestrator.shards import export_shards

    total_rounds = rounds + 1
    overrides = [*QUIET, *SETTINGS[setting], "--federation.rounds", str(total_rounds), "--personalization.enabled",
                 "false", "--device", "cpu"]
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    shards = export_shards(cfg, root / f"{setting}-shards")
    run_dir = root / f"{setting}-deployed"
    t0 = time.perf_counter()
    with LocalFederation(root / f"{setting}-flower", secure=secure) as fed:
        fed.start_superlink()
        for c, shard in enumerate(shards):
            fed.start_supernode(c, shard)
        infra = time.perf_counter() - t0
        t1 = time.perf_counter()
        fed.run({"config": "configs/smoke.yaml", "base-dir": str(REPO),
                 "overrides": " ".join(shlex.quote(o) for o in overrides) + f" --run_dir {run_dir}"})
        total = time.perf_counter() - t1
    with open(run_dir / "rounds.csv") as fh:
        seconds = [float(row["seconds"]) for row in csv.DictReader(fh)]
    mode = "TLS + auth" if secure else "insecure"
    return {"setting": setting, "backend": f"deployment ({len(shards)} SuperNodes, {mode})",
            "clients": cfg.clients_per_round, "start": infra + total - sum(seconds), "first": seconds[0],
            "steady": seconds[1:]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the first")
    parser.add_argument("--num-cpus", type=float, default=1, help="flower.num_cpus: CPUs per simulated client")
    parser.add_argument("--settings", nargs="+", default=["smoke", "cifar"], choices=list(SETTINGS))
    parser.add_argument("--deployment", nargs="*", default=[], choices=list(SETTINGS),
                        help="settings also run on Flower's deployment runtime (one SuperNode per client)")
    parser.add_argument("--insecure", action="store_true", help="deployment without TLS and authentication")
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, torch.get_num_threads()}),
                        help="torch thread counts of the in-process runs (default: 1 and torch's default)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            rows += bench(setting, args.rounds, args.num_cpus, args.threads, Path(tmp))
        for setting in args.deployment:
            rows.append(bench_deployment(setting, args.rounds, Path(tmp), secure=not args.insecure))
    cpu = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    try:
        import flwr
        import ray

        cpu += f", flwr {flwr.__version__}, ray {ray.__version__}"
    except ImportError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{cpu}; {args.rounds} timed rounds; load average at the end {load}\n")
    print("| setting | backend | clients/round | start (s) | first round (s) | s/round (mean ± sd) | vs in-process |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = {}
    for row in rows:
        mean = statistics.mean(row["steady"])
        sd = statistics.stdev(row["steady"]) if len(row["steady"]) > 1 else 0.0
        base.setdefault(row["setting"], mean)
        start = f"{row['start']:.1f}" if row["start"] else "-"
        print(f"| {row['setting']} | {row['backend']} | {row['clients']} | {start} | {row['first']:.2f} | "
              f"{mean:.2f} ± {sd:.2f} | {mean / base[row['setting']]:.2f}x |")


if __name__ == "__main__":
    main()
