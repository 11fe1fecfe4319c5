"""Dataset sources: .npz arrays, torchvision directories (offline), IDX files, synthetic."""
from __future__ import annotations

import gzip
import os
import urllib.error

import numpy as np
import pytest

from fl_sd.data import DataError, ImageDataset, load_dataset, make_synthetic
from fl_sd.data import sources

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
CIFAR10_MINI = os.path.join(SHARED, "cifar10_mini.npz")
CIFAR100_MINI = os.path.join(SHARED, "cifar100_mini.npz")
needs_mini = pytest.mark.skipif(not os.path.isfile(CIFAR10_MINI), reason="shared cifar mini arrays absent")


@needs_mini
def test_npz_cifar10_mini():
    ds = load_dataset("npz", path=CIFAR10_MINI)
    assert isinstance(ds, ImageDataset)
    assert ds.train_images.shape == (5482, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (1017, 32, 32, 3) and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    assert ds.num_classes == 10 and ds.image_shape == (3, 32, 32)
    assert ds.classes is not None and len(ds.classes) == 10
    counts = np.bincount(ds.train_labels, minlength=10)
    assert counts.min() == 527 and counts.max() == 577
    # mean/std computed from the training images, in [0, 1] units
    x = ds.train_images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(ds.mean, x.mean(0), atol=1e-4)
    np.testing.assert_allclose(ds.std, x.std(0), atol=1e-4)
    # the caller may pass the paper's constants instead
    ds2 = load_dataset("npz", path=CIFAR10_MINI, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert ds2.mean == (0.485, 0.456, 0.406) and ds2.std == (0.229, 0.224, 0.225)


@needs_mini
def test_npz_cifar100_mini():
    ds = load_dataset("npz", path=CIFAR100_MINI)
    assert ds.train_images.shape == (1117, 32, 32, 3)
    assert ds.test_images.shape == (916, 32, 32, 3)
    assert ds.num_classes == 100
    assert ds.train_labels.max() < 100 and ds.test_labels.min() >= 0


def test_paper_normalisation_constants():
    assert sources.NORMALISATION["cifar10"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert sources.NORMALISATION["cifar100"] == ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))
    assert sources.NORMALISATION["mnist"] == ((0.1307,), (0.3081,))


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(
        train_images=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
        train_labels=np.arange(12) % 4,
        test_images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
        test_labels=np.arange(6) % 4,
    )
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_small_valid_and_grayscale(tmp_path):
    ds = load_dataset("npz", path=str(_write_npz(tmp_path / "ok.npz")))
    assert ds.num_classes == 4 and ds.image_shape == (3, 8, 8) and ds.name == "ok"
    gray = load_dataset("npz", path=str(_write_npz(
        tmp_path / "g.npz", train_images=np.zeros((12, 8, 8), np.uint8), test_images=np.zeros((6, 8, 8), np.uint8),
        classes=np.array(list("abcde")))))
    assert gray.image_shape == (1, 8, 8) and gray.num_classes == 5 and gray.classes == tuple("abcde")
    assert gray.std == (1.0,)  # a constant channel is left unscaled


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(test_labels=None), r"lacks key\(s\) \['test_labels'\]"),
        (dict(train_images=np.zeros((12, 8, 8, 5), np.uint8)), "train_images has shape"),
        (dict(train_images=np.zeros((12, 64), np.uint8)), "train_images has shape"),
        (dict(test_images=np.zeros((6, 8, 8, 3), np.float32)), "dtype float32"),
        (dict(train_labels=np.arange(11)), "train_labels has shape"),
        (dict(train_labels=np.arange(12) * 0.5), "integer labels"),
        (dict(test_labels=np.array([0, 1, 2, 3, -1, 0])), "labels span"),
        (dict(classes=np.array(["a", "b"])), "labels span"),
        (dict(test_images=np.zeros((6, 9, 8, 3), np.uint8)), "differ in shape"),
    ],
)
def test_npz_invalid_content_raises(tmp_path, overrides, match):
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError, match=match):
        load_dataset("npz", path=str(path))


def test_npz_unreadable_files_raise(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset("npz", path=str(junk))
    truncated = _write_npz(tmp_path / "trunc.npz")
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DataError):
        load_dataset("npz", path=str(truncated))
    npy = tmp_path / "arr.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match="not an .npz archive"):
        load_dataset("npz", path=str(npy))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("npz", path=str(tmp_path / "missing.npz"))
    with pytest.raises(DataError, match="path="):
        load_dataset("npz")


def test_missing_torchvision_root_names_dir_and_files(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", root=str(root), download=False)
    msg = str(err.value)
    assert str(root) in msg and "cifar-100-python" in msg and "npz" in msg and "\n" not in msg
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=str(root), download=False)


@pytest.mark.parametrize("download", [False, True])
def test_corrupt_or_partial_cifar_files_are_named_not_called_missing(tmp_path, monkeypatch, download):
    import torchvision.datasets as tvd

    def offline(self):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [n for n, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list] + [tvd.CIFAR10.meta["filename"]]
    for name in names:
        (folder / name).write_bytes(b"\x80\x04 truncated pickle")
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", root=str(tmp_path), download=download)
    msg = str(err.value)
    assert str(folder / names[0]) in msg and "corrupt" in msg and "delete" in msg and "not found" not in msg
    assert f"{len(names) - 1} more file(s)" in msg and "\n" not in msg
    for name in names[1:]:
        (folder / name).unlink()
    with pytest.raises(DataError, match="corrupt"):  # the one file left is still damaged
        load_dataset("cifar10", root=str(tmp_path), download=download)
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "check_integrity", lambda path, md5=None: os.path.exists(path))  # an intact file...
    with pytest.raises(DataError, match=r"is incomplete \(missing data_batch_2, "):  # ... but the others are gone
        load_dataset("cifar10", root=str(tmp_path), download=download)


def test_offline_download_falls_back_to_data_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def offline(self):
        calls.append(type(self).__name__)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)  # CIFAR100 inherits it
    with pytest.raises(DataError, match="URLError"):
        load_dataset("cifar100", root=str(tmp_path), download=True)
    assert calls == ["CIFAR100"]


def test_fmnist_missing_names_dir_and_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(DataError) as err:
        load_dataset("fmnist", root=str(tmp_path), download=False)
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "FashionMNIST", "raw") in msg and "dataset-fashion-mnist" in msg


def _write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_like_idx_files_are_read(tmp_path, gz, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xtr, xte = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    ytr, yte = np.arange(20) % 10, np.arange(5)
    for name, arr in (("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                      ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)):
        _write_idx(raw / name, arr, gz)
    ds = load_dataset("fashion-mnist", root=str(tmp_path), download=False)
    assert ds.name == "fmnist" and ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train_images[..., 0], xtr)
    np.testing.assert_array_equal(ds.test_labels, yte)
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)
    # a truncated file is reported, not mis-read
    if not gz:
        (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:100])
        with pytest.raises(DataError, match="truncated"):
            load_dataset("fmnist", root=str(tmp_path), download=False)


@pytest.mark.skipif(not os.path.isdir(sources.DEBIAN_FASHION_MNIST_DIR),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fmnist_from_debian_package(tmp_path):
    ds = load_dataset("fmnist", root=str(tmp_path), download=False)
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))


def test_unknown_dataset_and_stray_options():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="only for dataset 'synthetic'"):
        load_dataset("npz", path="x.npz", num_classes=3)
    with pytest.raises(DataError, match="channels"):
        load_dataset("synthetic", channels=2)
    with pytest.raises(DataError, match="train_per_class"):
        load_dataset("synthetic", train_per_class=0)


def test_synthetic_shapes_and_determinism():
    a = load_dataset("synthetic", num_classes=5, train_per_class=20, test_per_class=4, seed=3)
    b = make_synthetic(num_classes=5, train_per_class=20, test_per_class=4, seed=3)
    c = make_synthetic(num_classes=5, train_per_class=20, test_per_class=4, seed=4)
    assert a.train_images.shape == (100, 32, 32, 3) and a.test_images.shape == (20, 32, 32, 3)
    assert a.train_images.dtype == np.uint8 and a.train_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(a.train_labels), np.full(5, 20))
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_images, b.test_images)
    assert not np.array_equal(a.train_images, c.train_images)
    x = a.train_images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(a.mean, x.mean(0), atol=1e-4)
    np.testing.assert_allclose(a.std, x.std(0), atol=1e-4)
    g = make_synthetic(num_classes=3, train_per_class=4, test_per_class=2, image_size=28, channels=1)
    assert g.image_shape == (1, 28, 28) and len(g.mean) == 1


def _nearest_class_mean_accuracy(ds):
    xtr = ds.train_images.reshape(len(ds.train_images), -1).astype(np.float64)
    xte = ds.test_images.reshape(len(ds.test_images), -1).astype(np.float64)
    mu = np.stack([xtr[ds.train_labels == k].mean(0) for k in range(ds.num_classes)])
    d = (xte**2).sum(1)[:, None] - 2 * xte @ mu.T + (mu**2).sum(1)[None]
    return float((d.argmin(1) == ds.test_labels).mean())


def test_synthetic_is_learnable_but_not_trivial():
    ds = make_synthetic(num_classes=10, train_per_class=200, test_per_class=50, seed=0)
    acc = _nearest_class_mean_accuracy(ds)
    assert 0.8 < acc  # chance is 0.1
    hard = make_synthetic(num_classes=10, train_per_class=200, test_per_class=50, seed=0, clutter=3.0)
    assert 0.2 < _nearest_class_mean_accuracy(hard) < acc  # clutter makes it harder, still learnable

    from sklearn.linear_model import LogisticRegression

    def features(x):  # flattened 4x4-average-pooled pixels (8x8x3): keeps the fit fast
        return x.reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(x), -1) / 255.0 - 0.5

    clf = LogisticRegression(max_iter=300).fit(features(ds.train_images), ds.train_labels)
    assert clf.score(features(ds.test_images), ds.test_labels) > 0.8
