"""Personalisation: every client fine-tunes the model it is handed for E epochs; accuracy after each epoch 0..E."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .algorithms import Algorithm
from .algorithms.context import FINETUNE_STREAM, ClientJob, State
from .clients import ClientRuntime
from .config import PersonalizationConfig
from .errors import TrainingDiverged
from .evaluation import client_accuracy


def personalize(runtime: ClientRuntime, algorithm: Algorithm, settings: PersonalizationConfig, batch_size: int,
                start_state: State, store: dict[int, State], start_round: int, lr: float) -> dict[str, Any]:
    """Fine-tune every client from the model the algorithm hands it (``client_model`` of the start state after
    ``start_round`` rounds, ``lr`` the schedule's lr there) with ``settings`` (part, lr, epochs, loss); record the
    final head's accuracy on the client's test split after every epoch (one optimizer across epochs). Clients
    without test data have no score: they are skipped and counted (``clients_without_test``)."""
    tested = [c for c in range(runtime.num_clients) if runtime.test_sizes[c] > 0]
    curve = np.zeros((settings.epochs + 1, runtime.num_clients))
    bs = settings.batch_size or batch_size
    t0 = time.perf_counter()
    for c in tested:
        runtime.load(algorithm.client_model(runtime, ClientJob(c, start_round, lr, store.get(c)), start_state))
        curve[0, c] = client_accuracy(runtime, c)
        if settings.epochs == 0:
            continue

        def on_epoch_end(epoch: int, c=c) -> None:
            curve[epoch, c] = client_accuracy(runtime, c)

        try:
            runtime.train(runtime.batches(c, 0, settings.epochs, FINETUNE_STREAM, batch_size=bs), start=None,
                          part=settings.part, lr=settings.lr, head_lr=settings.lr, loss=runtime.finetune_loss,
                          on_epoch_end=on_epoch_end, steps_per_epoch=math.ceil(runtime.train_sizes[c] / bs))
        except FloatingPointError as err:
            raise TrainingDiverged(f"personalisation, client {c}: {err}") from None
    curve *= 100
    if len(tested) < runtime.num_clients:
        curve = np.ascontiguousarray(curve[:, tested])
    result = {"part": settings.part, "epochs": settings.epochs, "lr": settings.lr,
              "seconds": time.perf_counter() - t0, "acc_mean": curve.mean(axis=1).tolist(),
              "acc_std": curve.std(axis=1).tolist(), "per_client": curve.T.tolist()}
    if curve.shape[1] < runtime.num_clients:
        result["clients_without_test"] = runtime.num_clients - len(tested)
    return result
