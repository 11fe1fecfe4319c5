"""The batched engine against the sequential one and the bare-loop floor: seconds per round, seconds per
personalisation phase and peak memory, for MobileNet (CIFAR-100 shape) and the 4-conv CNN (CIFAR-10 shape).

Every (model, K, engine) runs in its own process (peak memory is per process: CUDA max_memory_allocated, else the
resident set), variants interleaved over repeats. K clients per round, each with 500 images, 10 steps of batch 50
(the paper's clients), MHMD; personalisation: all K clients fine-tune for ``--epochs`` epochs.

    python benchmarks/engine.py                                   # both models, K = 10 and 100
    (engine "compiled": batched with batched.compile = reduce-overhead on a GPU, default on a CPU; keep --warmup >= 1,
    the first round compiles)
    OMP_NUM_THREADS=1 python benchmarks/engine.py --models cnn4 --clients 10 --rounds 1 --epochs 1   # a CPU
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CLASSES = {"mobilenet": 100, "cnn4": 10}
#: compiled = batched + batched.compile (warm-up compiles); channels_last = sequential + memory_format channels_last
ENGINES = ("sequential", "channels_last", "batched", "compiled", "floor")


def child(model: str, clients: int, engine: str, rounds: int, epochs: int, warmup: int, device: str) -> dict:
    import torch

    from orchestrator.backends import make_backend
    from orchestrator.config import load_config
    from orchestrator.federation import Federation
    from round_time import floor_round, timed

    k = CLASSES[model]
    backend = "batched" if engine in ("batched", "compiled") else "inprocess"
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    compile_mode = ("reduce-overhead" if on_gpu else "default") if engine == "compiled" else "off"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(HERE.parent / "configs" / "smoke.yaml", [
            "--run_dir", tmp, "--device", device, "--backend", backend, "--model.name", model, "--model.options", "{}",
            "--algorithm.name", "mhmd", "--data.partition", "iid", "--data.num_clients", str(clients),
            "--data.synthetic", f"{{num_classes: {k}, train_per_class: {500 * clients // k}, "
                                f"test_per_class: {max(1, 100 * clients // k)}}}",
            "--federation.client_fraction", "1.0", "--federation.local_epochs", "1", "--federation.batch_size", "50",
            "--federation.lr", "0.1", "--federation.rounds", "1000", "--personalization.epochs", str(epochs),
            "--tracking.progress", "false", "--tracking.wandb", "disabled", "--batched.compile", compile_mode,
            "--memory_format", "channels_last" if engine == "channels_last" else "contiguous"])
        fed = Federation(cfg, tmp, log=lambda *_: None)
        runner = make_backend(backend, cfg, tmp, fed.runtime, fed.algorithm)
        step = (lambda r: floor_round(fed, r)) if engine == "floor" else (lambda r: fed.run_round(runner))
        for r in range(warmup):
            step(r)
        if fed.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(fed.device)
        seconds = [timed(lambda: step(warmup + r), fed.device) for r in range(rounds)]
        personalize = None
        if engine != "floor" and epochs > 0:
            personalize = timed(fed.personalize, fed.device)
        if fed.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(fed.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"round": statistics.median(seconds), "personalize": personalize, "peak_mib": peak,
                "device": str(fed.device), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet", "cnn4"], choices=sorted(CLASSES))
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 100], help="K, clients per round")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per process (median)")
    parser.add_argument("--epochs", type=int, default=1, help="personalisation epochs (0: not measured)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation, caches)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per variant, interleaved")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "K", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, k, engine = args.child
        print(json.dumps(child(model, int(k), engine, args.rounds, args.epochs, args.warmup, args.device)))
        return
    results: dict[tuple, list[dict]] = {}
    for _ in range(args.repeats):
        for model in args.models:
            for k in args.clients:
                for engine in args.engines:
                    cmd = [sys.executable, __file__, "--child", model, str(k), engine, "--rounds", str(args.rounds),
                           "--epochs", str(args.epochs), "--warmup", str(args.warmup), "--device", args.device]
                    t0 = time.perf_counter()
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"{model} K={k} {engine}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                        continue
                    results.setdefault((model, k, engine), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"  {model} K={k} {engine}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"\n{args.rounds} timed round(s) after {args.warmup} warm-up, personalisation {args.epochs} epoch(s); "
          f"median over {args.repeats} process(es)\n")
    print("| model | K | device | threads | engine | s/round | x floor | personalisation s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for k in args.clients:
            floor = results.get((model, k, "floor"))
            floor_s = statistics.median(r["round"] for r in floor) if floor else None
            for engine in args.engines:
                runs = results.get((model, k, engine))
                if not runs:
                    continue
                s = statistics.median(r["round"] for r in runs)
                pers = [r["personalize"] for r in runs if r["personalize"] is not None]
                ratio = f"{s / floor_s:.2f}" if floor_s else "-"
                print(f"| {model} | {k} | {runs[0]['device']} | {runs[0]['threads']} | {engine} | {s:.3f} | {ratio} | "
                      f"{statistics.median(pers):.2f} | " if pers else
                      f"| {model} | {k} | {runs[0]['device']} | {runs[0]['threads']} | {engine} | {s:.3f} | {ratio} | - | ",
                      end="")
                print(f"{max(r['peak_mib'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
