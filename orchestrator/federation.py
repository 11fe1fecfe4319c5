"""The federated round loop: sample clients, run local updates, aggregate, evaluate, personalise.

Everything random derives from (seed, round, client): client sampling, batch order and augmentation. A resumed run,
another backend or another client order therefore gives the same numbers.
"""
from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fl_sd.data import DeviceData, Partition, client_batches, load_dataset, make_partition, seeded_generator
from fl_sd.losses import LossConfig, MultiHeadLoss
from fl_sd.models import create_model, model_entry
from lightning_modules import MultiHeadClassifier
from lightning_modules.client import build_loss_config as module_loss_config

from .aggregation import WeightedMean
from .algorithms import get_algorithm
from .config import Config, ConfigError
from .evaluation import head_names, per_client, predict, summarize

#: Tags that keep the random streams of the different uses apart.
SAMPLING_TAG, FINETUNE_TAG = 7_919, 1_000_003


class TrainingDiverged(RuntimeError):
    """A local loss became NaN/Inf."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key device: {name!r} asked for but CUDA is not available; use device: auto or cpu")
    return device


def sample_clients(seed: int, round_idx: int, num_clients: int, m: int) -> np.ndarray:
    """m distinct clients for this round, uniformly without replacement, from (seed, round) alone; sorted."""
    rng = np.random.default_rng([seed, SAMPLING_TAG, round_idx])
    return np.sort(rng.choice(num_clients, size=m, replace=False))


def lr_at(round_idx: int, lr: float, rounds: int, milestones: list[float], gamma: float) -> float:
    """Step schedule: lr x gamma after each milestone round int(frac * R) (the reference's R/2 and 3R/4)."""
    passed = sum(round_idx >= int(frac * rounds) for frac in milestones)
    return lr * gamma**passed


def build_loss_config(model_name: str, preset: str, options: dict[str, Any]) -> LossConfig:
    """Model defaults (per-architecture weights, SPEC 'Decisions') < the preset < explicit options."""
    try:
        return module_loss_config(preset, options, model_name)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key algorithm.loss_options: {err}") from None


def load_state_(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the network's tensors in place (no new module, no reallocation)."""
    own = net.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


class Federation:
    """One federated run. ``run()`` trains, evaluates and personalises; ``state_dict()`` is its checkpoint."""

    def __init__(self, cfg: Config, run_dir: str | Path, partition: Partition | None = None, log: Callable = print):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = log
        self.device = resolve_device(cfg.device)
        self.algorithm = get_algorithm(cfg.algorithm.name)(cfg.algorithm.options)
        d, f = cfg.data, cfg.federation

        # -- data ---------------------------------------------------------------------------------------------
        synthetic = d.synthetic if d.dataset == "synthetic" else {}  # data.synthetic applies to that source only
        self.dataset = load_dataset(d.dataset, root=d.root, download=d.download, path=d.path, **synthetic)
        num_classes = cfg.model.num_classes or self.dataset.num_classes
        if num_classes != self.dataset.num_classes:
            raise ConfigError(f"config key model.num_classes: {num_classes} but dataset {d.dataset} has "
                              f"{self.dataset.num_classes} classes; remove model.num_classes or fix it")
        self.partition = partition or make_partition(
            d.partition, self.dataset.train_labels, self.dataset.test_labels, d.num_clients, cfg.seed,
            shards_per_client=d.shards_per_client, alpha=d.alpha, num_classes=num_classes)
        if self.partition.num_clients != d.num_clients:
            raise ConfigError(f"config key data.num_clients: {d.num_clients} but the partition has "
                              f"{self.partition.num_clients} clients")
        ds = self.dataset
        self.train_data = DeviceData(ds.train_images, ds.train_labels, ds.mean, ds.std, self.device)
        self.test_data = DeviceData(ds.test_images, ds.test_labels, ds.mean, ds.std, self.device)
        self.train_sizes = np.array([len(ix) for ix in self.partition.train])
        self.test_sizes = np.array([len(ix) for ix in self.partition.test])
        self.test_owner = torch.as_tensor(self.partition.test_owner(len(ds.test_labels)), device=self.device)
        self._train_index = [torch.as_tensor(ix, device=self.device) for ix in self.partition.train]
        self._test_index = [torch.as_tensor(ix, device=self.device) for ix in self.partition.test]

        # -- model --------------------------------------------------------------------------------------------
        torch.manual_seed(cfg.seed)
        net = create_model(cfg.model.name, num_classes=num_classes, **self._model_options())
        preset = cfg.algorithm.loss or self.algorithm.loss
        self.train_loss = build_loss_config(cfg.model.name, preset, cfg.algorithm.loss_options)
        ft_preset = cfg.personalization.loss or preset
        self.ft_loss = build_loss_config(cfg.model.name, ft_preset, cfg.algorithm.loss_options)
        self.module = MultiHeadClassifier(net=net, train_part=self.algorithm.train_part, lr=f.lr,
                                          momentum=f.momentum, weight_decay=f.weight_decay).to(self.device)
        self.module.loss_fn = MultiHeadLoss(self.train_loss)
        self.heads = head_names(net)
        self.body_keys = net.body_state_keys()
        self.head_keys = net.head_state_keys()
        self.global_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.shared_keys = self.algorithm.shared_keys(self)
        self.shared_bytes = sum(self.global_state[k].numel() * self.global_state[k].element_size()
                                for k in self.shared_keys)

        # -- progress state (all of it is checkpointed) -----------------------------------------------------
        self.round = 0  # rounds completed
        self.client_state: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.history: list[dict[str, Any]] = []  # one record per evaluation
        self.round_log: list[dict[str, Any]] = []  # one record per round
        self.best: dict[str, Any] = {"round": None, "acc": -1.0, "state": None}
        self.personalization: dict[str, Any] | None = None
        self.algorithm.setup(self)

    # -- small helpers --------------------------------------------------------------------------------------
    def _model_options(self) -> dict[str, Any]:
        builder = model_entry(self.cfg.model.name).builder
        accepted = set(inspect.signature(builder).parameters)
        options = {k: v for k, v in self.algorithm.model_defaults.items() if k in accepted}
        c, h, _ = self.dataset.image_shape
        if "in_channels" in accepted:
            options["in_channels"] = c
        if "input_size" in accepted:
            options["input_size"] = h
        options.update(self.cfg.model.options)
        return options

    def global_body(self) -> dict[str, torch.Tensor]:
        return {k: self.global_state[k] for k in self.body_keys}

    def global_head(self) -> dict[str, torch.Tensor]:
        return {k: self.global_state[k] for k in self.head_keys}

    def num_train_samples(self, client: int) -> int:
        return int(self.train_sizes[client])

    def lr(self, round_idx: int) -> float:
        f = self.cfg.federation
        return lr_at(round_idx, f.lr, f.rounds, f.lr_milestones, f.lr_gamma)

    def head_lr(self, lr: float) -> float:
        f = self.cfg.federation
        return lr if f.head_lr is None else f.head_lr * lr / f.lr

    def sample_clients(self, round_idx: int) -> np.ndarray:
        return sample_clients(self.cfg.seed, round_idx, self.cfg.data.num_clients, self.cfg.clients_per_round)

    def client_batches(self, client: int, round_idx: int, epochs: int, batch_size: int | None = None, tag: int = 0):
        """The client's training batches for ``epochs`` epochs, seeded by (seed, tag, round, client)."""
        gen = seeded_generator(self.cfg.seed, tag, round_idx, client)
        return client_batches(self.train_data, self._train_index[client], batch_size or self.cfg.federation.batch_size,
                              epochs, gen, augment=self.cfg.data.augment)

    # -- one round --------------------------------------------------------------------------------------------
    def run_round(self, backend) -> dict[str, Any]:
        r = self.round
        lr = self.lr(r)
        clients = self.sample_clients(r)
        agg = WeightedMean()
        metrics: dict[str, list[float]] = {}
        start = time.perf_counter()
        self.module.loss_fn = MultiHeadLoss(self.train_loss)

        def sink(client: int, update) -> None:
            agg.add(self.algorithm.shared_state(self, update), float(update.num_samples))
            for key, value in update.metrics.items():
                metrics.setdefault(key, []).append(value)

        try:
            backend.run_clients(self, r, [int(c) for c in clients], lr, sink)
        except FloatingPointError as err:
            raise TrainingDiverged(f"round {r + 1}: {err}") from None
        self.algorithm.apply_aggregate(self, agg.result())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record = {"round": r + 1, "lr": lr, "clients": len(clients), "seconds": time.perf_counter() - start,
                  "bytes_sent": self.shared_bytes * len(clients), "bytes_received": self.shared_bytes * len(clients)}
        record.update({f"train_{k}": float(np.mean(v)) for k, v in metrics.items()})
        self.round += 1
        self.round_log.append(record)
        return record

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, float], np.ndarray]:
        """Accuracy of every head on every client's test split; returns (summary, per-client acc (H, N))."""
        net = self.module.net
        load_state_(net, state)
        bs = self.cfg.federation.eval_batch_size
        n = self.cfg.data.num_clients
        if not self.algorithm.per_client_models:
            correct, loss = predict(net, self.test_data, None, bs)
            acc = per_client(correct, self.test_owner, n).cpu().numpy()
            lss = per_client(loss, self.test_owner, n).cpu().numpy()
        else:
            acc = np.zeros((len(self.heads), n))
            lss = np.zeros((len(self.heads), n))
            for c in range(n):
                self.algorithm.load_client_model(self, c, state, self.client_state)
                correct, loss = predict(net, self.test_data, self._test_index[c], bs)
                acc[:, c] = correct.double().mean(1).cpu().numpy()
                lss[:, c] = loss.double().mean(1).cpu().numpy()
            load_state_(net, state)
        return summarize(acc, lss, self.test_sizes, self.heads), acc

    def evaluate(self) -> dict[str, Any]:
        summary, _ = self.evaluate_state(self.global_state)
        summary.update(self._temperature_stats())
        record = {"round": self.round, **summary}
        if summary["acc_final"] > self.best["acc"]:
            self.best = {"round": self.round, "acc": summary["acc_final"],
                         "state": {k: v.clone() for k, v in self.global_state.items()},
                         "client_state": _clone_client_state(self.client_state)}
        record["best_acc_final"] = self.best["acc"]
        record["best_round"] = self.best["round"]
        self.history.append(record)
        return record

    @torch.no_grad()
    def _temperature_stats(self) -> dict[str, float]:
        """Mean learned temperature sigmoid(s) of each auxiliary head on (up to 1000) test images."""
        net = self.module.net
        net.eval()
        x, _ = next(iter(self.test_data.iterate(min(1000, len(self.test_data)))))
        out = net(x)
        return {f"temp_aux{i}": float(t.mean()) for i, t in enumerate(out.temperature)}

    # -- personalisation ------------------------------------------------------------------------------------
    def personalize(self) -> dict[str, Any]:
        """Every client fine-tunes from the selected model for E epochs; accuracy after each epoch 0..E."""
        p = self.cfg.personalization
        use_best = self.cfg.federation.select == "best" and self.best["state"] is not None
        start = self.best["state"] if use_best else self.global_state
        client_start = self.best.get("client_state", {}) if use_best else self.client_state
        n = self.cfg.data.num_clients
        curve = np.zeros((p.epochs + 1, n))
        self.module.loss_fn = MultiHeadLoss(self.ft_loss)
        bs = p.batch_size or self.cfg.federation.batch_size
        t0 = time.perf_counter()
        for c in range(n):
            self.algorithm.load_client_model(self, c, start, client_start)
            curve[0, c] = self._client_accuracy(c)
            if p.epochs == 0:
                continue
            steps = math.ceil(self.train_sizes[c] / bs)

            def on_epoch_end(epoch: int, c=c) -> None:
                curve[epoch, c] = self._client_accuracy(c)

            try:
                self.module.local_update(self.client_batches(c, 0, p.epochs, bs, tag=FINETUNE_TAG),
                                         train_part=p.part, lr=p.lr, head_lr=p.lr,
                                         on_epoch_end=on_epoch_end, steps_per_epoch=steps)
            except FloatingPointError as err:
                raise TrainingDiverged(f"personalisation, client {c}: {err}") from None
        curve *= 100
        self.personalization = {
            "start_from": "best" if use_best else "final", "start_round": self.best["round"] if use_best else self.round,
            "part": p.part, "epochs": p.epochs, "lr": p.lr, "seconds": time.perf_counter() - t0,
            "acc_mean": curve.mean(axis=1).tolist(), "acc_std": curve.std(axis=1).tolist(),
            "per_client": curve.T.tolist()}
        return self.personalization

    def _client_accuracy(self, client: int) -> float:
        correct, _ = predict(self.module.net, self.test_data, self._test_index[client],
                             self.cfg.federation.eval_batch_size)
        return float(correct[0].double().mean())

    # -- whole run ----------------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        final_eval = self.history[-1] if self.history else None
        return {
            "name": self.cfg.name, "algorithm": self.cfg.algorithm.name, "seed": self.cfg.seed,
            "rounds": self.round, "model_selection": "best final-head test accuracy over evaluations (the paper's "
            "protocol: selected on the test set)" if self.cfg.federation.select == "best" else "final round",
            "best_round": self.best["round"], "best_acc_final": self.best["acc"],
            "global_final": final_eval, "global_best": next((h for h in self.history
                                                             if h["round"] == self.best["round"]), None),
            "personalized": self.personalization,
        }

    # -- checkpoint state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "global_state": self.global_state, "client_state": self.client_state,
                "best": self.best, "history": self.history, "round_log": self.round_log,
                "personalization": self.personalization, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self.global_state
        if state["global_state"].keys() != own.keys():
            raise ValueError("checkpoint model does not match the configured model (different state keys)")
        for key, value in state["global_state"].items():
            if value.shape != own[key].shape:
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the configured model "
                                 f"{tuple(own[key].shape)} (other model or class count?)")
            own[key].copy_(value)
        self.round = state["round"]
        self.client_state = _to_device(state["client_state"], self.device)
        best = dict(state["best"])
        best["state"] = _to_device(best.get("state"), self.device)
        best["client_state"] = _to_device(best.get("client_state", {}), self.device)
        self.best = best
        self.history = list(state["history"])
        self.round_log = list(state["round_log"])
        self.personalization = state.get("personalization")
        torch.set_rng_state(state["torch_rng"])


def _clone_client_state(store):
    return {c: {k: {n: t.clone() for n, t in part.items()} for k, part in s.items()} for c, s in store.items()}


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
