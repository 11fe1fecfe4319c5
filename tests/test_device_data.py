"""Device-resident batches: on-device augmentation equals torchvision's; seeded draws; client epochs."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fl_sd.data import DataError, DeviceData, client_batches, load_dataset, make_synthetic, seeded_generator

CIFAR10_MINI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10_mini.npz")


@pytest.fixture(scope="module")
def rgb():
    if os.path.isfile(CIFAR10_MINI):
        ds = load_dataset("npz", path=CIFAR10_MINI, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    else:  # real images preferred, synthetic is enough
        ds = make_synthetic(num_classes=10, train_per_class=20, test_per_class=2)
    return ds


@pytest.fixture(scope="module")
def gray():
    return make_synthetic(num_classes=4, train_per_class=8, test_per_class=2, image_size=28, channels=1, seed=1)


def torchvision_reference(img_hwc: np.ndarray, top: int, left: int, flip: bool, mean, std, pad: int = 4):
    """pad 4 zeros -> crop at (top, left) of the padded image -> hflip -> to_tensor -> normalize, on a PIL image."""
    pil = Image.fromarray(img_hwc[..., 0] if img_hwc.shape[2] == 1 else img_hwc)
    h, w = img_hwc.shape[:2]
    out = TF.crop(TF.pad(pil, pad, fill=0), top, left, h, w)
    if flip:
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), mean, std)


@pytest.mark.parametrize("which", ["rgb", "gray"])
def test_augmentation_equals_torchvision_for_fixed_offsets(which, request):
    ds = request.getfixturevalue(which)
    data = DeviceData.from_dataset(ds, "train")
    cases = [(0, 0, 0), (8, 8, 1), (0, 8, 1), (8, 0, 0), (4, 4, 0), (4, 4, 1), (1, 7, 1), (6, 2, 0)]
    idx = torch.arange(len(cases)) * 3 + 1
    offsets = torch.tensor([[c[0] for c in cases], [c[1] for c in cases]])
    flips = torch.tensor([c[2] for c in cases])
    out = data.augment(idx, offsets, flips)
    assert out.dtype == torch.float32 and out.shape == (len(cases),) + ds.image_shape
    for j, (top, left, flip) in enumerate(cases):
        ref = torchvision_reference(ds.train_images[int(idx[j])], top, left, bool(flip), ds.mean, ds.std)
        torch.testing.assert_close(out[j], ref, atol=1e-6, rtol=0)
    # padding is black (0) before normalisation: offset (0, 0) leaves 4 padded rows on top
    pad_value = (-torch.tensor(ds.mean) / torch.tensor(ds.std)).view(-1, 1, 1)
    torch.testing.assert_close(out[0, :, :4, :], pad_value.expand(-1, 4, ds.image_shape[2]), atol=1e-6, rtol=0)


def test_unaugmented_batch_is_only_normalisation(rgb, gray):
    for ds in (rgb, gray):
        data = DeviceData.from_dataset(ds, "test")
        idx = torch.tensor([5, 0, 2])
        x, y = data.batch(idx, augment=False)
        for j, i in enumerate(idx.tolist()):
            img = ds.test_images[i]
            pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
            torch.testing.assert_close(x[j], TF.normalize(TF.to_tensor(pil), ds.mean, ds.std), atol=1e-6, rtol=0)
        assert y.dtype == torch.int64 and y.tolist() == ds.test_labels[idx.numpy()].tolist()
        # iterate: in order, unaugmented, everything once
        xs, ys = zip(*data.iterate(batch_size=7))
        assert [len(b) for b in ys] == [7] * (len(data) // 7) + ([len(data) % 7] if len(data) % 7 else [])
        torch.testing.assert_close(torch.cat(xs), data.batch(torch.arange(len(data)))[0])
        sub = np.array([3, 1])
        (xsub, ysub), = list(data.iterate(batch_size=5, indices=sub))
        assert ysub.tolist() == ds.test_labels[sub].tolist()


def _position_coded_data(n: int = 1) -> DeviceData:
    """A 32x32 image whose channel 0 holds row + 1 and channel 1 col + 1 (0 = padding); identity normalisation."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = np.arange(1, 33)[:, None]
    img[..., 1] = np.arange(1, 33)[None, :]
    return DeviceData(np.repeat(img[None], n, 0), np.zeros(n, np.int64), mean=(0, 0, 0), std=(1, 1, 1))


def _decode(x: torch.Tensor):
    """Recover (row offset, col offset, flip) in padded coordinates from position-coded augmented images."""
    v = torch.round(x * 255).long()
    oy = v[:, 0, 16, 16] - 13  # output row 16 = original row oy - 4 + 16  ->  value oy + 13
    c15, c16 = v[:, 1, 16, 15], v[:, 1, 16, 16]
    flip = c16 < c15
    ox = torch.where(flip, c15 - 13, c15 - 12)
    return oy, ox, flip


def test_offsets_and_flips_have_the_right_frequencies():
    data = _position_coded_data()
    n = 81 * 2 * 80
    x, _ = data.batch(torch.zeros(n, dtype=torch.long), augment=True, generator=seeded_generator(123))
    oy, ox, flip = _decode(x)
    assert oy.min() == 0 and oy.max() == 8 and ox.min() == 0 and ox.max() == 8
    cells = torch.bincount((oy * 9 + ox) * 2 + flip.long(), minlength=162).double()
    assert cells.numel() == 162 and cells.min() > 0  # every offset with and without flip occurs
    expected = n / 162
    chi2 = float(((cells - expected) ** 2 / expected).sum())
    assert chi2 < 161 + 5 * math.sqrt(2 * 161), chi2  # dof 161: mean 161, sd ~18
    assert abs(flip.double().mean().item() - 0.5) < 0.02
    # client_batches draws from the same distribution
    xs = torch.cat([b for b, _ in client_batches(data, np.zeros(4000, np.int64), 500, 1, seeded_generator(9))])
    oy2, ox2, flip2 = _decode(xs)
    assert set(oy2.tolist()) == set(range(9)) and set(ox2.tolist()) == set(range(9))
    assert abs(flip2.double().mean().item() - 0.5) < 0.04
    # unaugmented: no shift, no flip
    oy3, ox3, flip3 = _decode(data.batch(torch.zeros(3, dtype=torch.long))[0])
    assert oy3.tolist() == [4] * 3 and ox3.tolist() == [4] * 3 and not flip3.any()


def test_same_seed_same_batches_different_seed_different(rgb):
    data = DeviceData.from_dataset(rgb, "train")
    idx = np.arange(0, 230, 2)

    def run(*keys):
        return [(x.clone(), y.clone()) for x, y in client_batches(data, idx, 50, 2, seeded_generator(*keys))]

    a, b, c = run(0, 1, 2), run(0, 1, 2), run(0, 2, 1)
    assert len(a) == len(b) == len(c) == 6
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    g1, g2 = seeded_generator(7), seeded_generator(7)
    torch.testing.assert_close(data.batch([1, 2, 3], augment=True, generator=g1)[0],
                               data.batch([1, 2, 3], augment=True, generator=g2)[0], atol=0, rtol=0)


def test_seeded_generator_keys():
    draw = lambda *k: torch.randint(0, 2**30, (4,), generator=seeded_generator(*k)).tolist()  # noqa: E731
    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({tuple(draw(1, 2)), tuple(draw(2, 1)), tuple(draw(1, 2, 0)), tuple(draw(1, 3))}) == 4
    with pytest.raises(DataError, match="integers >= 0"):
        seeded_generator(-1)


def test_client_batches_cover_each_index_once_per_epoch():
    n_all = 300
    data = DeviceData(np.zeros((n_all, 8, 8, 3), np.uint8), np.arange(n_all), mean=(0, 0, 0), std=(1, 1, 1))
    client = np.random.default_rng(0).choice(n_all, 123, replace=False)
    batches = list(client_batches(data, client, 50, 3, seeded_generator(0, 0, 4)))
    assert len(batches) == math.ceil(123 / 50) * 3
    assert [len(y) for _, y in batches] == [50, 50, 23] * 3
    epochs = [torch.cat([y for _, y in batches[e * 3 : (e + 1) * 3]]) for e in range(3)]
    for ys in epochs:
        assert sorted(ys.tolist()) == sorted(client.tolist())
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert batches[0][0].shape == (50, 3, 8, 8) and batches[0][0].dtype == torch.float32
    dropped = list(client_batches(data, client, 50, 2, seeded_generator(1), drop_last=True))
    assert [len(y) for _, y in dropped] == [50, 50] * 2
    plain = list(client_batches(data, torch.from_numpy(client), 50, 1, seeded_generator(1), augment=False))
    assert sorted(torch.cat([y for _, y in plain]).tolist()) == sorted(client.tolist())
    assert list(client_batches(data, np.array([], np.int64), 50, 2, seeded_generator(0))) == []


def test_device_data_validation():
    with pytest.raises(DataError, match="uint8"):
        DeviceData(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int64), (0, 0, 0), (1, 1, 1))
    with pytest.raises(DataError, match="one integer label per image"):
        DeviceData(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, np.int64), (0, 0, 0), (1, 1, 1))
    with pytest.raises(DataError, match="per channel"):
        DeviceData(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64), (0,), (1,))
    data = DeviceData(np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64), (0.5,), (0.25,))
    assert data.image_shape == (1, 4, 4) and data.images.dtype == torch.uint8
    with pytest.raises(DataError, match="batch_size"):
        list(client_batches(data, [0, 1], 0, 1, seeded_generator(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(rgb):
    cpu = DeviceData.from_dataset(rgb, "train", "cpu")
    gpu = DeviceData.from_dataset(rgb, "train", "cuda")
    idx = np.arange(0, 400, 3)
    a = list(client_batches(cpu, idx, 50, 2, seeded_generator(3, 1, 4)))
    b = list(client_batches(gpu, idx, 50, 2, seeded_generator(3, 1, 4)))
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xb.is_cuda
        torch.testing.assert_close(xa, xb.cpu(), atol=1e-6, rtol=0)
        assert torch.equal(ya, yb.cpu())
