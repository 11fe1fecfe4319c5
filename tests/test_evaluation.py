"""Per-client evaluation: BatchNorm without running statistics sees one client's test split per batch (as FedBABU's
``test_img_local``); the one-pass fast path where predictions do not depend on the batch, its pass size and the
learned temperatures taken from it; clients without test data."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fed_fixtures import TINY, make_fed
from orchestrator import evaluation
from orchestrator.evaluation import (batch_dependent, pass_images, predict, predict_splits, shared_model, summarize,
                                      temperature_stats)


def _alone(runtime, client):
    """The client's split as one batch through the network, by hand."""
    ix = runtime.partition.test[client]
    x, y = runtime.test_data.batch(torch.as_tensor(ix))
    runtime.net.eval()
    with torch.no_grad():
        out = runtime.net(x)
    return out.final.argmax(1) == y, F.cross_entropy(out.final, y, reduction="none")


def test_bn_without_running_stats_evaluates_each_client_split_alone(tmp_path):
    fed = make_fed(tmp_path, *TINY, "--algorithm.name", "fedavg", "--data.num_clients", "4")
    runtime = fed.runtime
    assert batch_dependent(runtime.net)
    acc, loss = shared_model(runtime, fed.server.global_state)
    for c in range(runtime.num_clients):
        correct, losses = _alone(runtime, c)
        assert acc[0, c] == correct.double().mean().item()
        assert loss[0, c] == losses.double().mean().item()  # bitwise: one plain call per client, as the reference
    # the old one pass over the whole test set (batches mixing clients) gives other numbers: the test can fail
    correct_mixed, _ = runtime.predict(None)
    mixed = [correct_mixed[0, runtime.test_owner == c].double().mean().item() for c in range(runtime.num_clients)]
    assert not np.allclose(mixed, acc[0])


def test_splits_of_unequal_length_and_longer_than_a_batch(tmp_path):
    fed = make_fed(tmp_path, *TINY, "--algorithm.name", "fedbabu")
    runtime = fed.runtime
    runtime.load(fed.server.global_state)
    splits = [torch.arange(0, 5), torch.arange(5, 12), torch.arange(12, 17), torch.arange(0, 0), torch.arange(0, 20)]
    got = predict_splits(runtime.net, runtime.test_data, splits, batch_size=10)
    runtime.net.eval()
    for ix, (correct, loss) in zip(splits, got):
        assert correct.shape == loss.shape == (1 + runtime.net.num_aux_heads, len(ix))
        chunks = [ix[i:i + 10] for i in range(0, len(ix), 10)]  # longer than a batch: chunks of batch_size
        for k, chunk in enumerate(chunks):
            x, y = runtime.test_data.batch(chunk)
            with torch.no_grad():
                want = runtime.net(x).final.argmax(1) == y
            assert torch.equal(correct[0, 10 * k:10 * k + len(chunk)], want)


def test_running_statistics_keep_the_one_pass(tmp_path):
    fed = make_fed(tmp_path, *TINY, "--algorithm.name", "mhmd")
    runtime = fed.runtime
    assert not batch_dependent(runtime.net)
    acc, _ = shared_model(runtime, fed.server.global_state)
    each = runtime.predict_each(range(runtime.num_clients))
    assert np.allclose(acc[0], [c[0].double().mean().item() for c, _ in each])


def test_clients_without_test_data_are_left_out_of_the_means():
    acc = np.array([[0.5, np.nan, 1.0]])
    loss = np.array([[1.0, np.nan, 3.0]])
    out = summarize(acc, loss, np.array([10, 0, 30]), ["final"])
    assert out["acc_final"] == 75.0 and out["acc_final_std"] == 25.0
    assert out["acc_final_weighted"] == 100 * (0.5 * 0.25 + 1.0 * 0.75)
    assert out["loss_final"] == 1.0 * 0.25 + 3.0 * 0.75
    assert out["clients_without_test"] == 1
    assert "clients_without_test" not in summarize(acc[:, [0, 2]], loss[:, [0, 2]], np.array([10, 30]), ["final"])


def _forward_batches(net):
    """The batch sizes of every forward call of ``net`` from now on (a list that fills in)."""
    sizes: list[int] = []
    net.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    return sizes


#: 4 classes x 30 = 120 test images of 10 clients, BatchNorm with running statistics (one pass over the test set)
MORE_TEST = ("--data.synthetic", "{num_classes: 4, train_per_class: 20, test_per_class: 30, image_size: 16}",
             "--model.options", "{width: 8, track_running_stats: true}", "--data.partition", "iid")


def test_passes_without_batch_dependence_are_capped_on_a_cpu_and_give_the_same_numbers(tmp_path):
    fed = make_fed(tmp_path, *MORE_TEST, "--algorithm.name", "mhmd")
    runtime = fed.runtime
    runtime.load(fed.server.global_state)
    assert pass_images(500, torch.device("cpu")) == evaluation.CPU_PASS_IMAGES < 120
    assert pass_images(500, torch.device("cuda")) == 500 and pass_images(7, torch.device("cpu")) == 7
    sizes = _forward_batches(runtime.net)
    capped = predict(runtime.net, runtime.test_data, None, 500)
    assert sizes == [50, 50, 20]
    one = predict(runtime.net, runtime.test_data, None, 1)  # per image: the numbers do not depend on the pass size
    assert torch.equal(capped[0], one[0]) and torch.allclose(capped[1], one[1], rtol=1e-6, atol=0)


def test_temperatures_come_from_the_evaluation_pass_and_equal_their_own_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "TEMPERATURE_IMAGES", 70)  # cut inside the second pass of 50
    fed = make_fed(tmp_path, *MORE_TEST, "--algorithm.name", "mhmd")
    runtime = fed.runtime
    sizes = _forward_batches(runtime.net)
    summary = fed.evaluate()
    assert sizes == [50, 50, 20]  # no second forward pass for the temperatures
    got = {k: v for k, v in summary.items() if k.startswith("temp_")}
    sizes.clear()
    want = temperature_stats(runtime, fed.server.global_state)  # its own pass: the first 70 images as one batch
    assert sizes == [70] and len(want) == runtime.net.num_aux_heads == 3
    assert got == want  # bitwise


def test_temperatures_of_batch_dependent_models_keep_their_own_batch(tmp_path):
    fed = make_fed(tmp_path, *TINY, "--algorithm.name", "fedavg")
    runtime = fed.runtime
    assert batch_dependent(runtime.net)
    sizes = _forward_batches(runtime.net)
    summary = fed.evaluate()
    # each client's split as one batch, then the first (here: all 20) test images as one batch
    assert sizes == [int(n) for n in runtime.test_sizes] + [20] and sum(sizes[:-1]) == 20
    want = temperature_stats(runtime, fed.server.global_state)
    assert {k: v for k, v in summary.items() if k.startswith("temp_")} == want and len(want) == 3


def test_temperature_pass_evaluation_takes_batch_dependent_temperatures_from_the_client_passes(tmp_path, monkeypatch):
    """federation.temperature_pass: evaluation -- no extra pass; each of the first TEMPERATURE_IMAGES test images
    with the temperature its client's batch gave it; other numbers than the reference's own batch (can fail)."""
    monkeypatch.setattr(evaluation, "TEMPERATURE_IMAGES", 13)
    fed = make_fed(tmp_path, *TINY, "--algorithm.name", "fedavg", "--data.num_clients", "4",
                   "--federation.temperature_pass", "evaluation")
    runtime = fed.runtime
    assert batch_dependent(runtime.net) and runtime.temperature_pass == "evaluation"
    sizes = _forward_batches(runtime.net)
    summary = fed.evaluate()
    assert sizes == [int(n) for n in runtime.test_sizes]  # the client splits only
    got = {k: v for k, v in summary.items() if k.startswith("temp_")}
    runtime.load(fed.server.global_state)
    runtime.net.eval()
    owned = sorted(i for c in range(runtime.num_clients) for i in runtime.partition.test[c])
    first = set(owned[:13])
    picked = [[] for _ in range(runtime.net.num_aux_heads)]
    for c in range(runtime.num_clients):
        ix = torch.as_tensor(runtime.partition.test[c])
        x, _ = runtime.test_data.batch(ix)
        with torch.no_grad():
            out = runtime.net(x)
        for h, t in enumerate(out.temperature):
            picked[h] += [t[k].double() for k, i in enumerate(ix.tolist()) if i in first]
    assert all(len(p) == 13 for p in picked)
    want = {f"temp_aux{h}": float(torch.stack(p).mean()) for h, p in enumerate(picked)}
    assert got.keys() == want.keys() and len(got) == 3
    for key in want:
        assert abs(got[key] - want[key]) < 1e-6, key
    reference = temperature_stats(runtime, fed.server.global_state)  # the 13 images as one batch of their own
    assert any(abs(reference[k] - got[k]) > 1e-6 for k in got)


def test_scores_unpack_and_index_as_the_accuracy_loss_pair(tmp_path):
    fed = make_fed(tmp_path, *TINY, "--algorithm.name", "mhmd")
    scores = shared_model(fed.runtime, fed.server.global_state)
    acc, loss = scores
    assert acc is scores.acc and loss is scores.loss and scores[0] is acc and scores[1] is loss
    assert acc.shape == loss.shape == (4, fed.runtime.num_clients)
    assert set(scores.temperatures) == {"temp_aux0", "temp_aux1", "temp_aux2"}  # running stats: from the pass


def test_stacked_scores_passes_stay_within_the_pass_size_and_equal_client_by_client(tmp_path, monkeypatch):
    """Per-client models evaluated stacked (batched engine): 4 clients x 5 test images, eval_batch_size 10 -> passes
    of 2 clients (10 images), not one pass of 4; the scores equal those of the unsplit pass of 4 and each model's its
    client-by-client evaluation (BatchNorm without running statistics: the same batches)."""
    from fl_sd.stacked import StackedModels

    fed = make_fed(tmp_path, *TINY, "--algorithm.name", "fedavg", "--backend", "batched", "--precision", "64-true",
                   "--federation.eval_batch_size", "10", "--data.partition", "iid")
    runtime = fed.runtime
    assert batch_dependent(runtime.net) and list(runtime.test_sizes) == [5, 5, 5, 5]
    gen = torch.Generator().manual_seed(0)
    states = [{k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
               for k, v in fed.server.global_state.items()} for _ in range(4)]
    shapes = []
    real = evaluation.stacked_forward
    monkeypatch.setattr(evaluation, "stacked_forward", lambda net, models, x: shapes.append(tuple(x.shape[:2]))
                        or real(net, models, x))
    acc, loss = evaluation.stacked_scores(runtime, StackedModels.stack(states, list(states[0])), [0, 1, 2, 3])
    assert shapes == [(2, 5), (2, 5)]
    shapes.clear()  # unsplit: all 4 clients in one vmapped pass (the limit before this change)
    monkeypatch.setattr(evaluation, "pass_images", lambda batch_size, device: 4 * batch_size)
    whole_acc, whole_loss = evaluation.stacked_scores(runtime, StackedModels.stack(states, list(states[0])),
                                                      [0, 1, 2, 3])
    assert shapes == [(4, 5)]
    assert np.array_equal(acc, whole_acc) and np.allclose(loss, whole_loss, rtol=1e-12, atol=0)
    for c, state in enumerate(states):
        runtime.load(state)
        correct, losses = runtime.predict(c)
        assert np.array_equal(acc[:, c], correct.double().mean(1).numpy())
        assert np.allclose(loss[:, c], losses.double().mean(1).numpy(), rtol=1e-10, atol=0)
