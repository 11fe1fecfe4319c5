"""Personalisation: every client fine-tunes the model it is handed for E epochs; accuracy after each epoch 0..E."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from fl_sd.stacked import StackedModels
from lightning_modules.batched import ClientFailed

from .algorithms import Algorithm
from .algorithms.context import FINETUNE_STREAM, ClientJob, State
from .clients import ClientRuntime
from .config import PersonalizationConfig
from .errors import TrainingDiverged
from .evaluation import client_accuracy, stacked_scores


def personalize(runtime: ClientRuntime, algorithm: Algorithm, settings: PersonalizationConfig, batch_size: int,
                start_state: State, store: dict[int, State], start_round: int, lr: float,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fine-tune every client from the model the algorithm hands it (``client_model`` of the start state after
    ``start_round`` rounds, ``lr`` the schedule's lr there) with ``settings`` (part, lr, epochs, loss); record the
    final head's accuracy on the client's test split after every epoch (one optimizer across epochs). Clients
    without test data have no score: they are skipped and counted (``clients_without_test``). ``progress(done,
    total)`` is called after each client (after all of them for the batched engine)."""
    tested = [c for c in range(runtime.num_clients) if runtime.test_sizes[c] > 0]
    curve = np.zeros((settings.epochs + 1, runtime.num_clients))
    bs = settings.batch_size or batch_size
    t0 = time.perf_counter()
    if runtime.batch_clients:
        _personalize_batched(runtime, algorithm, settings, bs, start_state, store, start_round, lr, curve, tested)
    for done, c in enumerate([] if runtime.batch_clients else tested):
        if progress is not None and done:
            progress(done, len(tested))
        runtime.load(algorithm.client_model(runtime, ClientJob(c, start_round, lr, store.get(c)), start_state))
        curve[0, c] = client_accuracy(runtime, c)
        if settings.epochs == 0:
            continue

        def on_epoch_end(epoch: int, c=c) -> None:
            curve[epoch, c] = client_accuracy(runtime, c)

        try:
            runtime.train(runtime.batches(c, 0, settings.epochs, FINETUNE_STREAM, batch_size=bs), start=None,
                          part=settings.part, lr=settings.lr, head_lr=settings.lr, loss=runtime.finetune_loss,
                          on_epoch_end=on_epoch_end, steps_per_epoch=math.ceil(runtime.train_sizes[c] / bs),
                          momentum=settings.momentum)
        except FloatingPointError as err:
            raise TrainingDiverged(f"personalisation, client {c}: {err}") from None
    if progress is not None:
        progress(len(tested), len(tested))
    curve *= 100
    if len(tested) < runtime.num_clients:
        curve = np.ascontiguousarray(curve[:, tested])
    result = {"part": settings.part, "epochs": settings.epochs, "lr": settings.lr,
              "seconds": time.perf_counter() - t0, "acc_mean": curve.mean(axis=1).tolist(),
              "acc_std": curve.std(axis=1).tolist(), "per_client": curve.T.tolist()}
    if curve.shape[1] < runtime.num_clients:
        result["clients_without_test"] = runtime.num_clients - len(tested)
    return result


def _personalize_batched(runtime: ClientRuntime, algorithm: Algorithm, settings: PersonalizationConfig, bs: int,
                         start_state: State, store: dict[int, State], start_round: int, lr: float,
                         curve: np.ndarray, tested: list[int]) -> None:
    """:func:`personalize` with the batched engine: a chunk of clients (``runtime.chunks``) fine-tunes as one
    computation; each is evaluated after every one of its epochs (its own momentum carries over, as sequentially)."""
    keys = list(runtime.initial_state)

    def fine_tune(clients: list[int]) -> None:
        starts = [algorithm.client_model(runtime, ClientJob(c, start_round, lr, store.get(c)), start_state)
                  for c in clients]
        curve[0, clients] = stacked_scores(runtime, StackedModels.stack(starts, keys), clients)[0][0]
        if settings.epochs == 0:
            return

        def on_epoch_end(done: list[tuple[int, int]], models: StackedModels) -> None:
            ks = [k for k, _ in done]
            sub = models.select(torch.as_tensor(ks, device=runtime.device))
            accuracy = stacked_scores(runtime, sub, [clients[k] for k in ks])[0][0]
            for (k, epoch), value in zip(done, accuracy):
                curve[epoch, clients[k]] = value

        try:
            runtime.train_batched(
                [runtime.batches(c, 0, settings.epochs, FINETUNE_STREAM, batch_size=bs) for c in clients],
                starts=starts, part=settings.part, lr=settings.lr, head_lr=settings.lr, loss=runtime.finetune_loss,
                steps_per_epoch=[math.ceil(runtime.train_sizes[c] / bs) for c in clients], on_epoch_end=on_epoch_end,
                momentum=settings.momentum)
        except ClientFailed as err:
            raise TrainingDiverged(f"personalisation, client {clients[err.index]}: {err}") from None

    runtime.chunks.run(tested, fine_tune)  # a chunk that runs out of memory is fine-tuned again in halves
