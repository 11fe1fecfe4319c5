"""The federated round loop: sample clients, run their local updates, aggregate, evaluate, personalise.

:class:`Federation` only composes the pieces and drives them: the client side (:class:`~orchestrator.clients.
ClientRuntime`), the server side (:class:`~orchestrator.server.Server`), the algorithm and, per round, an execution
backend (``orchestrator.backends``). Everything random derives from (seed, round, client): client sampling, batch
order and augmentation. A resumed run, another backend or another client order therefore gives the same numbers.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fl_sd.data import Partition

from .aggregation import WeightedMean
from .algorithms.context import ClientJob
from .build import make_algorithm, model_description, resolve_device
from .clients import ClientResult, ClientRuntime
from .config import Config
from .errors import TrainingDiverged
from .evaluation import summarize, temperature_stats
from .personalization import personalize
from .server import Server, clone_state, lr_at, sample_clients


class Federation:
    """One federated run. ``run_round``, ``evaluate``, ``personalize``; ``state_dict()`` is its checkpoint."""

    def __init__(self, cfg: Config, run_dir: str | Path, partition: Partition | None = None,
                 log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.algorithm = make_algorithm(cfg)
        self.runtime = ClientRuntime.from_config(cfg, self.algorithm, partition, resolve_device(cfg.device), log)
        self.server = Server(self.runtime.initial_state, cfg.federation.select,
                             model_description(cfg, self.runtime.net.num_classes), log)
        self.shared_keys = self.algorithm.shared_keys(self.runtime.body_keys, self.runtime.head_keys)
        state = self.server.global_state
        self.shared_bytes = sum(state[k].numel() * state[k].element_size() for k in self.shared_keys)
        self.algorithm.setup(self.server)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def partition(self) -> Partition:
        return self.runtime.partition

    @property
    def round(self) -> int:
        return self.server.round

    def lr(self, round_idx: int) -> float:
        f = self.cfg.federation
        return lr_at(round_idx, f.lr, f.rounds, f.lr_milestones, f.lr_gamma)

    def sample_clients(self, round_idx: int) -> np.ndarray:
        return sample_clients(self.cfg.seed, round_idx, self.cfg.data.num_clients, self.cfg.clients_per_round)

    # -- one round ---------------------------------------------------------------------------------------------------
    def run_round(self, backend) -> dict[str, Any]:
        server, f = self.server, self.cfg.federation
        r = server.round
        lr = self.lr(r)
        jobs = [ClientJob(int(c), r, lr, server.store.get(int(c))) for c in self.sample_clients(r)]
        agg = WeightedMean()
        metrics: dict[str, list[float]] = {}
        start = time.perf_counter()

        def on_result(result: ClientResult) -> None:
            update = result.update
            loss = update.metrics.get("loss")
            if f.diverge_loss is not None and loss is not None and loss > f.diverge_loss:
                raise TrainingDiverged(f"round {r + 1}: client {result.client}: mean local loss {loss:.3g} exceeds "
                                       f"federation.diverge_loss {f.diverge_loss:g}")
            agg.add(self.algorithm.shared_state(update), float(update.num_samples))
            server.keep(result.client, result.own_state)
            for key, value in update.metrics.items():
                metrics.setdefault(key, []).append(value)

        start_state = clone_state(server.global_state) if self.algorithm.needs_round_start_state else None
        try:
            backend.run_clients(jobs, server.global_state, on_result)
        except FloatingPointError as err:
            raise TrainingDiverged(f"round {r + 1}: {err}") from None
        self.algorithm.apply_aggregate(server.global_state, agg.result())
        self.algorithm.end_round(r, [job.client for job in jobs], start_state)
        self.check_weights(r + 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record = {"round": r + 1, "lr": lr, "clients": len(jobs), "seconds": time.perf_counter() - start,
                  "bytes_sent": self.shared_bytes * len(jobs), "bytes_received": self.shared_bytes * len(jobs)}
        record.update({f"train_{k}": float(np.mean(v)) for k, v in metrics.items()})
        server.round += 1
        server.round_log.append(record)
        return record

    def check_weights(self, round_idx: int) -> None:
        """Divergence without NaN: a global weight beyond ``federation.diverge_weight`` (or non-finite) stops the run."""
        bound = self.cfg.federation.diverge_weight
        if bound is None:
            return
        for key, value in self.server.global_state.items():
            if value.is_floating_point() and value.numel():
                peak = float(value.detach().abs().max())
                if not peak <= bound:
                    raise TrainingDiverged(f"round {round_idx}: global weight {key} reached |w| = {peak:.3g}, beyond "
                                           f"federation.diverge_weight {bound:g}")

    # -- evaluation and personalisation --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Evaluate the current global model (with each client's own part, as the algorithm says); select the best."""
        server, runtime = self.server, self.runtime
        scores = self.algorithm.evaluate(runtime, server.global_state, server.store, server.round,
                                         self.lr(server.round))
        acc, loss = scores
        # the learned temperatures: from the evaluation's own passes when it made them with one model for every
        # client (Scores.temperatures), else those of the global model from a pass of their own
        temperatures = getattr(scores, "temperatures", None)
        if temperatures is None:
            temperatures = temperature_stats(runtime, server.global_state)
        summary = summarize(acc, loss, runtime.test_sizes, runtime.heads)
        summary.update(temperatures)
        return server.record_evaluation(summary)

    def personalize(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Every client fine-tunes from the selected model for E epochs; accuracy after each epoch 0..E.
        ``progress(done, total)`` after each client."""
        state, store, start_round, which = self.server.selected_model()
        result = personalize(self.runtime, self.algorithm, self.cfg.personalization, self.cfg.federation.batch_size,
                             state, store, start_round, self.lr(start_round), progress)
        self.server.personalization = {"start_from": which, "start_round": start_round, **result}
        return self.server.personalization

    # -- whole run -----------------------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        server = self.server
        final_eval = server.history[-1] if server.history else None
        return {
            "name": self.cfg.name, "algorithm": self.cfg.algorithm.name, "seed": self.cfg.seed,
            "rounds": server.round, "model_selection": "best final-head test accuracy over evaluations (the paper's "
            "protocol: selected on the test set)" if self.cfg.federation.select == "best" else "final round",
            "best_round": server.best["round"], "best_acc_final": server.best["acc"],
            "global_final": final_eval, "global_best": next((h for h in server.history
                                                             if h["round"] == server.best["round"]), None),
            "personalized": server.personalization,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.server.state_dict(), "algorithm": self.algorithm.state_dict(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state, self.device)
        self.algorithm.load_state_dict(state.get("algorithm") or {}, self.device)
        torch.set_rng_state(state["torch_rng"])
