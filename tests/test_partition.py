"""Partitions: the reference's label shards (SPEC §6.2), Dirichlet, IID; persistence."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fl_sd.data import DataError, Partition, make_partition


def cifar_labels(num_classes: int, train_per_class: int, test_per_class: int, shuffled: bool, seed: int = 7):
    ytr = np.repeat(np.arange(num_classes), train_per_class)
    yte = np.repeat(np.arange(num_classes), test_per_class)
    if shuffled:
        rng = np.random.default_rng(seed)
        ytr, yte = rng.permutation(ytr), rng.permutation(yte)
    return ytr, yte


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def check_shards(part, ytr, yte, num_classes, s, n_clients, train_per_client, test_per_client):
    assert part.num_clients == n_clients
    np.testing.assert_array_equal(part.train_sizes(), np.full(n_clients, train_per_client))
    np.testing.assert_array_equal(part.test_sizes(), np.full(n_clients, test_per_client))
    assert_exact_cover(part.train, len(ytr))
    assert_exact_cover(part.test, len(yte))
    assert part.label_rows.shape == (n_clients, s)
    for i in range(n_clients):
        ctr = np.bincount(ytr[part.train[i]], minlength=num_classes)
        cte = np.bincount(yte[part.test[i]], minlength=num_classes)
        assert (ctr > 0).sum() <= s
        # same label multiset: each train shard of a class maps to one test shard of it (ratio = per-client sizes)
        np.testing.assert_array_equal(ctr * test_per_client, cte * train_per_client)
        np.testing.assert_array_equal(ctr, np.bincount(part.label_rows[i], minlength=num_classes)
                                      * (train_per_client // s))
        assert part.train[i].dtype == np.int64 and part.test[i].dtype == np.int64


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("s", [2, 10, 100])
def test_shards_cifar100_shape(s, shuffled):
    ytr, yte = cifar_labels(100, 500, 100, shuffled)
    part = make_partition("shards", ytr, yte, num_clients=100, seed=0, shards_per_client=s)
    check_shards(part, ytr, yte, 100, s, 100, 500, 100)


@pytest.mark.parametrize("s", [2, 5, 10])
def test_shards_cifar10_shape(s):
    ytr, yte = cifar_labels(10, 5000, 1000, shuffled=True)
    part = make_partition("shards", ytr, yte, num_clients=100, seed=3, shards_per_client=s)
    check_shards(part, ytr, yte, 10, s, 100, 500, 100)


def test_shards_distinct_classes_match_spec_table():
    # SPEC §6.2: expected distinct classes per user ~ 63 (s=100), 39.5 (s=50), 9.6 (s=10) on CIFAR-100
    ytr, yte = cifar_labels(100, 500, 100, shuffled=False)
    for s, expected in ((100, 63.4), (50, 39.5), (10, 9.56)):
        part = make_partition("shards", ytr, yte, 100, seed=1, shards_per_client=s)
        mean_distinct = np.mean([len(np.unique(ytr[a])) for a in part.train])
        assert abs(mean_distinct - expected) < 0.06 * expected, (s, mean_distinct)


def test_shards_are_contiguous_runs_of_each_class_in_dataset_order():
    ytr, yte = cifar_labels(100, 500, 100, shuffled=True)
    part = make_partition("shards", ytr, yte, 100, seed=0, shards_per_client=10)
    # class k's indices in dataset order, cut into 10 shards of 50: shard j = positions 50j..50j+49 of that list
    positions = {k: {int(v): p for p, v in enumerate(np.flatnonzero(ytr == k))} for k in range(100)}
    for i in range(100):
        for shard in part.train[i].reshape(10, 50):
            k = int(ytr[shard[0]])
            assert np.all(ytr[shard] == k)
            pos = np.array([positions[k][int(v)] for v in shard])
            assert pos[0] % 50 == 0
            np.testing.assert_array_equal(pos, np.arange(pos[0], pos[0] + 50))


def test_shards_leftovers_go_one_each_to_first_shards():
    # 10 classes x 53 samples, 10 clients x 2 shards: 2 shards/class of 26, the 1 leftover goes to the first shard
    ytr, yte = cifar_labels(10, 53, 11, shuffled=False)
    part = make_partition("shards", ytr, yte, 10, seed=0, shards_per_client=2)
    assert_exact_cover(part.train, len(ytr))
    assert_exact_cover(part.test, len(yte))
    assert part.train_sizes().sum() == 530
    sizes = sorted(len(a) for a in part.train)
    assert set(sizes) <= {52, 53, 54} and sum(sizes) == 530
    # the first shard of class 0 is its positions 0..25 plus the leftover (position 52)
    for idx in part.train:
        for label in np.unique(ytr[idx]):
            sel = idx[ytr[idx] == label]
            if 0 + 53 * label in sel:  # client holding the first shard of `label`
                assert 52 + 53 * label in sel


def test_shards_seed_determinism():
    ytr, yte = cifar_labels(100, 50, 10, shuffled=True)
    a = make_partition("shards", ytr, yte, 10, seed=5, shards_per_client=20)
    b = make_partition("shards", ytr, yte, 10, seed=5, shards_per_client=20)
    c = make_partition("shards", ytr, yte, 10, seed=6, shards_per_client=20)
    assert all(np.array_equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test))
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(kind="shards", num_clients=10, shards_per_client=5, num_classes=100), "shards_per_client"),  # 50 < 100
        (dict(kind="shards", num_clients=30, shards_per_client=5, num_classes=100), "shards not possible"),
        (dict(kind="shards", num_clients=10, shards_per_client=0), "shards_per_client"),
        (dict(kind="dirichlet", num_clients=10, alpha=0.0), "alpha"),
        (dict(kind="dirichlet", num_clients=10, alpha=-1), "alpha"),
        (dict(kind="iid", num_clients=0), "num_clients"),
        (dict(kind="iid", num_clients=10_001), "num_clients"),
        (dict(kind="pathological", num_clients=10), "kind"),
    ],
)
def test_impossible_values_raise_data_error_naming_the_key(kwargs, key):
    ytr, yte = cifar_labels(100, 100, 20, shuffled=False)
    kind = kwargs.pop("kind")
    with pytest.raises(DataError, match=key):
        make_partition(kind, ytr, yte, seed=0, **kwargs)


def test_labels_out_of_range_raise():
    with pytest.raises(DataError, match="num_classes"):
        make_partition("iid", np.array([0, 1, 5]), np.array([0, 1]), 2, 0, num_classes=3)


def test_dirichlet_sanity_and_skew():
    ytr, yte = cifar_labels(10, 500, 100, shuffled=True)
    skewed = make_partition("dirichlet", ytr, yte, 20, seed=0, alpha=0.05)
    uniform = make_partition("dirichlet", ytr, yte, 20, seed=0, alpha=1000.0)
    for part in (skewed, uniform):
        assert_exact_cover(part.train, len(ytr))
        assert_exact_cover(part.test, len(yte))
        assert part.train_sizes().min() >= 1
    distinct = lambda p: np.mean([len(np.unique(ytr[a])) for a in p.train])  # noqa: E731
    assert distinct(skewed) < 3.5
    assert distinct(uniform) == 10
    # large alpha: every client close to the global 10 % per class and to 250 samples
    for a in uniform.train:
        frac = np.bincount(ytr[a], minlength=10) / len(a)
        assert np.abs(frac - 0.1).max() < 0.05
    assert np.abs(uniform.train_sizes() - 250).max() < 40
    # test follows each client's train label distribution (largest-remainder rounding: off by < 1 per class)
    for tr, te in zip(skewed.train, skewed.test):
        expected = np.bincount(ytr[tr], minlength=10) * (100 / 500)
        got = np.bincount(yte[te], minlength=10)
        assert np.abs(got - expected).max() < 1.0 + 1e-9


def test_iid_sanity_and_seed():
    ytr, yte = cifar_labels(10, 103, 17, shuffled=True)
    a = make_partition("iid", ytr, yte, 7, seed=0)
    b = make_partition("iid", ytr, yte, 7, seed=0)
    c = make_partition("iid", ytr, yte, 7, seed=1)
    assert_exact_cover(a.train, len(ytr))
    assert_exact_cover(a.test, len(yte))
    assert a.train_sizes().max() - a.train_sizes().min() <= 1
    assert a.test_sizes().max() - a.test_sizes().min() <= 1
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train))
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train))
    d1 = make_partition("dirichlet", ytr, yte, 7, seed=0, alpha=0.5)
    d2 = make_partition("dirichlet", ytr, yte, 7, seed=0, alpha=0.5)
    d3 = make_partition("dirichlet", ytr, yte, 7, seed=2, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(d1.train + d1.test, d2.train + d2.test))
    assert not all(np.array_equal(x, y) for x, y in zip(d1.train, d3.train))


def test_save_load_roundtrip(tmp_path):
    ytr, yte = cifar_labels(100, 50, 10, shuffled=True)
    part = make_partition("shards", ytr, yte, 10, seed=2, shards_per_client=10)
    path = tmp_path / "sub" / "partition.npz"
    part.save(path)
    assert sorted(os.listdir(path.parent)) == ["partition.npz"]  # no temporary file left behind
    back = Partition.load(path)
    assert back.num_clients == 10
    assert all(np.array_equal(x, y) and y.dtype == np.int64 for x, y in zip(part.train + part.test,
                                                                             back.train + back.test))
    np.testing.assert_array_equal(back.label_rows, part.label_rows)
    assert back.meta == {"kind": "shards", "seed": 2, "shards_per_client": 10, "num_classes": 100}
    # overwrite in place, no pickle needed to read it
    make_partition("iid", ytr, yte, 3, seed=0).save(path)
    with np.load(path, allow_pickle=False) as z:
        assert "label_rows" not in z.files
    assert Partition.load(path).num_clients == 3


def test_load_missing_or_corrupt_partition_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Partition.load(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(DataError, match="corrupt"):
        Partition.load(bad)
    missing = tmp_path / "missing.npz"
    np.savez(missing, train_indices=np.arange(3))
    with pytest.raises(DataError, match="lacks"):
        Partition.load(missing)
    inconsistent = tmp_path / "inconsistent.npz"
    np.savez(inconsistent, train_indices=np.arange(3), train_offsets=np.array([0, 5]),
             test_indices=np.arange(2), test_offsets=np.array([0, 2]))
    with pytest.raises(DataError, match="inconsistent train"):
        Partition.load(inconsistent)
    truncated = tmp_path / "truncated.npz"
    make_partition("iid", np.arange(100) % 10, np.arange(20) % 10, 4, seed=0).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DataError):
        Partition.load(truncated)


def test_test_owner_groups_one_evaluation_pass():
    ytr, yte = cifar_labels(10, 50, 10, shuffled=True)
    part = make_partition("shards", ytr, yte, 5, seed=0, shards_per_client=2)
    owner = part.test_owner(len(yte))
    for i, idx in enumerate(part.test):
        assert np.all(owner[idx] == i)
    assert (owner >= 0).all()
