"""Client partitions of a dataset: the reference's label shards (SPEC §6.2), Dirichlet label skew, IID.

A :class:`Partition` holds, per client, int64 indices into the train set and into the test set. Every partitioner uses
one ``numpy.random.Generator`` seeded from ``seed`` for all of its randomness.

**The one intended deviation from the reference shards:** the reference draws the label-row shuffle with Python's
``random.shuffle`` and the shard picks with ``np.random.choice`` on numpy's global state (unseeded at HEAD). Here both
come from ``np.random.default_rng(seed)`` (the shuffle as a permutation, each pick as ``integers(0, remaining)``), so a
seed fixes the partition. The algorithm and its distribution are otherwise identical.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..io import atomic_write
from .sources import DataError, read_npz

__all__ = ["Partition", "make_partition", "shard_partition", "dirichlet_partition", "iid_partition",
           "PARTITION_KINDS"]

PARTITION_KINDS = ("shards", "dirichlet", "iid")
_FORMAT_VERSION = 1


@dataclass
class Partition:
    """Per-client index arrays into the train and test sets (client i owns ``train[i]`` and ``test[i]``)."""

    train: list[np.ndarray]  # per client: int64 indices into the train set
    test: list[np.ndarray]  # per client: int64 indices into the test set
    #: shards only: (num_clients, shards per client) label of each of client i's shards (the reference's
    #: ``rand_set_all``); None for other kinds.
    label_rows: np.ndarray | None = None
    #: how it was made, e.g. {"kind": "shards", "seed": 0, "shards_per_client": 10}; saved with it.
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train = [np.asarray(a, dtype=np.int64).reshape(-1) for a in self.train]
        self.test = [np.asarray(a, dtype=np.int64).reshape(-1) for a in self.test]
        if len(self.train) != len(self.test):
            raise DataError(f"partition has {len(self.train)} train splits but {len(self.test)} test splits")

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def train_sizes(self) -> np.ndarray:
        return np.array([len(a) for a in self.train], dtype=np.int64)

    def test_sizes(self) -> np.ndarray:
        return np.array([len(a) for a in self.test], dtype=np.int64)

    def test_owner(self, num_test: int | None = None) -> np.ndarray:
        """Client id of every test sample (-1 where none): groups one global evaluation pass by client."""
        n = num_test if num_test is not None else int(max((a.max() + 1 for a in self.test if len(a)), default=0))
        owner = np.full(n, -1, dtype=np.int64)
        for i, idx in enumerate(self.test):
            owner[idx] = i
        return owner

    # ------------------------------------------------------------------------------------------------------------
    # persistence: one .npz of plain arrays (no pickle), written atomically

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(_FORMAT_VERSION, dtype=np.int64),
            "train_indices": _concat(self.train),
            "train_offsets": _offsets(self.train),
            "test_indices": _concat(self.test),
            "test_offsets": _offsets(self.test),
        }
        if self.label_rows is not None:
            arrays["label_rows"] = np.asarray(self.label_rows, dtype=np.int64)
        for key, val in self.meta.items():  # plain scalars only: the file must load without pickle
            if isinstance(val, (bool, int, float, str, np.integer, np.floating)):
                arrays[f"meta_{key}"] = np.asarray(val)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Partition":
        path = os.fspath(path)
        arr = read_npz(path, ("train_indices", "train_offsets", "test_indices", "test_offsets"), "partition file",
                       where="check the path or re-create the partition", remake="delete it and re-create the partition")
        version = int(arr.get("format_version", _FORMAT_VERSION))
        if version > _FORMAT_VERSION:
            raise DataError(f"partition file {path!r} has format {version} (> {_FORMAT_VERSION}); fix: update fl-sd")
        train = _split(arr["train_indices"], arr["train_offsets"], path, "train")
        test = _split(arr["test_indices"], arr["test_offsets"], path, "test")
        if len(train) != len(test):
            raise DataError(f"partition file {path!r} has {len(train)} train but {len(test)} test clients; "
                            f"fix: re-create the partition")
        meta = {k[5:]: arr[k].item() if arr[k].ndim == 0 else arr[k].tolist() for k in arr if k.startswith("meta_")}
        label_rows = arr.get("label_rows")
        return cls(train=train, test=test, label_rows=label_rows, meta=meta)


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _offsets(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)


def _split(indices: np.ndarray, offsets: np.ndarray, path: str, what: str) -> list[np.ndarray]:
    ok = (
        indices.ndim == 1 and offsets.ndim == 1 and len(offsets) >= 1
        and np.issubdtype(indices.dtype, np.integer) and np.issubdtype(offsets.dtype, np.integer)
        and offsets[0] == 0 and offsets[-1] == len(indices) and np.all(np.diff(offsets) >= 0)
        and (len(indices) == 0 or indices.min() >= 0)
    )
    if not ok:
        raise DataError(f"partition file {path!r} has inconsistent {what} indices/offsets; "
                        f"fix: delete it and re-create the partition")
    return [indices[a:b].astype(np.int64) for a, b in zip(offsets[:-1], offsets[1:])]


# ---------------------------------------------------------------------------------------------------------------------
# partitioners


def make_partition(
    kind: str,
    train_labels,
    test_labels,
    num_clients: int,
    seed: int,
    *,
    shards_per_client: int = 2,
    alpha: float = 0.5,
    num_classes: int | None = None,
) -> Partition:
    """Split a dataset over ``num_clients`` clients.

    ``shards``: the reference's label shards (SPEC §6.2), ``shards_per_client`` = its ``shard_per_user``.
    ``dirichlet``: per class, client proportions ~ Dir(``alpha``); test follows each client's train label distribution.
    ``iid``: a uniform random split of both sets.
    """
    kind = str(kind).lower()
    if kind not in PARTITION_KINDS:
        raise DataError(f"partition kind {kind!r} is unknown; fix: choose one of {list(PARTITION_KINDS)}")
    ytr, yte, num_classes = _check_labels(train_labels, test_labels, num_classes)
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise DataError(f"num_clients={num_clients!r} is invalid; fix: use an integer >= 1")
    num_clients = int(num_clients)
    if num_clients > len(ytr):
        raise DataError(f"num_clients={num_clients} exceeds the {len(ytr)} training samples; "
                        f"fix: use at most {len(ytr)} clients")
    if kind == "shards":
        return shard_partition(ytr, yte, num_clients, seed, shards_per_client, num_classes)
    if kind == "dirichlet":
        return dirichlet_partition(ytr, yte, num_clients, seed, alpha, num_classes)
    return iid_partition(len(ytr), len(yte), num_clients, seed)


def _check_labels(train_labels, test_labels, num_classes):
    out = []
    for what, y in (("train_labels", train_labels), ("test_labels", test_labels)):
        y = np.asarray(y)
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
            raise DataError(f"{what} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
        out.append(y.astype(np.int64))
    ytr, yte = out
    if len(ytr) == 0:
        raise DataError("train_labels is empty; fix: load a dataset with training samples")
    hi = int(max(ytr.max(), yte.max() if len(yte) else 0))
    lo = int(min(ytr.min(), yte.min() if len(yte) else 0))
    if num_classes is None:
        num_classes = hi + 1
    if lo < 0 or hi >= num_classes:
        raise DataError(f"labels span [{lo}, {hi}] but num_classes={num_classes}; fix: labels must be 0..num_classes-1")
    return ytr, yte, int(num_classes)


def _seeded(seed: int, kind: str) -> np.random.Generator:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise DataError(f"seed={seed!r} is invalid; fix: use an integer >= 0")
    return np.random.default_rng(np.random.SeedSequence([int(seed), PARTITION_KINDS.index(kind)]))


def shard_partition(ytr: np.ndarray, yte: np.ndarray, num_clients: int, seed: int, shards_per_client: int,
                    num_classes: int) -> Partition:
    """SPEC §6.2 (FedBABU/MHMD ``noniid``), train and test with the same label rows."""
    s, n, c = shards_per_client, num_clients, num_classes
    if isinstance(s, bool) or int(s) != s or s < 1:
        raise DataError(f"shards_per_client={s!r} is invalid; fix: use an integer >= 1")
    s = int(s)
    shard_per_class = int(s * n / c)
    if shard_per_class < 1:
        raise DataError(f"shards_per_client={s} x num_clients={n} < num_classes={c}: not every class can get a "
                        f"shard; fix: raise shards_per_client to >= {-(-c // n)}")
    if (c * shard_per_class) % n:
        raise DataError(f"shards not possible: {c} classes x {shard_per_class} shards per class = "
                        f"{c * shard_per_class} shards do not divide among num_clients={n}; fix: choose "
                        f"shards_per_client so that shards_per_client*num_clients is a multiple of num_classes={c}")
    fewest = np.bincount(ytr, minlength=c).min()
    if fewest < shard_per_class:
        raise DataError(f"shards_per_client={s}: {shard_per_class} shards per class, but a class has only {fewest} "
                        f"training samples (empty shards); fix: lower shards_per_client or num_clients")
    rng = _seeded(seed, "shards")
    # rand_set_all: [0..C-1] repeated shard_per_class times, shuffled, reshaped (N, -1) (== s when s*N % C == 0)
    label_rows = rng.permutation(np.tile(np.arange(c, dtype=np.int64), shard_per_class)).reshape(n, -1)
    train = _assign_shards(ytr, label_rows, shard_per_class, c, rng)
    test = _assign_shards(yte, label_rows, shard_per_class, c, rng)
    empty = [i for i, a in enumerate(train) if len(a) == 0]
    if empty:
        raise DataError(f"shards: client(s) {empty[:5]} got no training samples (classes have fewer than "
                        f"{shard_per_class} samples); fix: lower shards_per_client or num_clients")
    meta = {"kind": "shards", "seed": int(seed), "shards_per_client": s, "num_classes": c}
    return Partition(train=train, test=test, label_rows=label_rows, meta=meta)


def _assign_shards(labels: np.ndarray, label_rows: np.ndarray, shard_per_class: int, num_classes: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    # 1-2: per class, its indices in dataset order, cut into shard_per_class contiguous equal shards; the leftovers
    # (the last len % shard_per_class indices) are appended one each to the first shards.
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    shards: list[list[np.ndarray]] = []
    for k in range(num_classes):
        x = order[bounds[k] : bounds[k + 1]]
        leftover = len(x) % shard_per_class
        body, extra = (x[: len(x) - leftover], x[len(x) - leftover :])
        parts = list(body.reshape(shard_per_class, -1))
        for i, idx in enumerate(extra):
            parts[i] = np.append(parts[i], idx)
        shards.append(parts)
    # 4: per client and label in its row, pop a remaining shard of that label uniformly at random.
    clients = []
    for row in label_rows:
        picked = [shards[label].pop(int(rng.integers(len(shards[label])))) for label in row]
        clients.append(np.concatenate(picked).astype(np.int64))
    return clients


def dirichlet_partition(ytr: np.ndarray, yte: np.ndarray, num_clients: int, seed: int, alpha: float,
                        num_classes: int, max_tries: int = 1000) -> Partition:
    """Per class, proportions over clients ~ Dir(alpha); redrawn until every client has >= 1 training sample.

    The test set of each class is divided among clients in proportion to their training counts of that class
    (largest-remainder rounding), so each client's test label distribution follows its training one and every test
    sample belongs to exactly one client. Test samples of a class absent from all training splits are spread uniformly.
    """
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise DataError(f"alpha={alpha!r} is invalid; fix: use a number > 0") from None
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"alpha={alpha!r} is invalid; fix: use a number > 0 (small = skewed, large = near IID)")
    rng = _seeded(seed, "dirichlet")
    n = num_clients
    by_class_tr = [rng.permutation(np.flatnonzero(ytr == k)) for k in range(num_classes)]
    counts = None
    for _ in range(max_tries):
        counts = np.zeros((num_classes, n), dtype=np.int64)
        for k, idx in enumerate(by_class_tr):
            if len(idx):
                p = rng.dirichlet(np.full(n, alpha))
                counts[k] = _round_counts(p * len(idx), len(idx))
        if counts.sum(axis=0).min() >= 1:
            break
    else:
        raise DataError(f"dirichlet: after {max_tries} draws some client still had no training sample "
                        f"(alpha={alpha}, num_clients={n}); fix: raise alpha or lower num_clients")
    train = _split_by_counts(by_class_tr, counts, n)
    test_counts = np.zeros((num_classes, n), dtype=np.int64)
    by_class_te = [rng.permutation(np.flatnonzero(yte == k)) for k in range(num_classes)]
    for k, idx in enumerate(by_class_te):
        weights = counts[k].astype(np.float64)
        if weights.sum() == 0:
            weights = np.ones(n)
        test_counts[k] = _round_counts(weights / weights.sum() * len(idx), len(idx))
    test = _split_by_counts(by_class_te, test_counts, n)
    meta = {"kind": "dirichlet", "seed": int(seed), "alpha": alpha, "num_classes": num_classes}
    return Partition(train=train, test=test, meta=meta)


def _round_counts(expected: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, largest-remainder rounding of ``expected`` (ties to the lower index)."""
    base = np.floor(expected).astype(np.int64)
    short = total - int(base.sum())
    if short > 0:
        base[np.argsort(-(expected - base), kind="stable")[:short]] += 1
    return base


def _split_by_counts(by_class: list[np.ndarray], counts: np.ndarray, n: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for k, idx in enumerate(by_class):
        for i, chunk in enumerate(np.split(idx, np.cumsum(counts[k])[:-1])):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def iid_partition(num_train: int, num_test: int, num_clients: int, seed: int) -> Partition:
    """A uniform random split: sizes differ by at most one."""
    rng = _seeded(seed, "iid")
    train = [np.sort(a) for a in np.array_split(rng.permutation(num_train), num_clients)]
    test = [np.sort(a) for a in np.array_split(rng.permutation(num_test), num_clients)]
    return Partition(train=train, test=test, meta={"kind": "iid", "seed": int(seed)})
