"""Device-resident data: a whole split as one uint8 tensor on the compute device, batches built by indexing.

The paper's train transform (SPEC §6.1) is RandomCrop(size, padding=4) -> RandomHorizontalFlip(0.5) -> ToTensor ->
Normalize. Here it runs batched on the device: the batch's uint8 images are zero-padded (black pixels, as torchvision
pads a PIL/uint8 image), then one ``gather`` with per-sample flat indices ``(oy + r) * W_pad + (ox + c)`` (``c``
reversed for flipped samples) cuts every sample's crop at once, then ``x / 255``, ``- mean``, ``/ std`` in float32, the
same operations in the same order as torchvision, so the values agree bit for bit.

Every random draw (the epoch's permutation, the crop offsets, the flips) comes from a CPU ``torch.Generator`` and is
then moved to the device: a CPU run and a GPU run with the same seeds see the same choices.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .sources import DataError, ImageDataset

__all__ = ["DeviceData", "seeded_generator", "client_batches", "PADDING"]

#: RandomCrop padding of the reference (SPEC §6.1).
PADDING = 4


class DeviceData:
    """A whole split resident on one device as uint8 NCHW + int64 labels; batches built by indexing."""

    images: torch.Tensor  # uint8 (N, C, H, W) on device
    labels: torch.Tensor  # int64 (N,) on device

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, device="cpu", padding: int = PADDING,
                 dtype: torch.dtype = torch.float32):
        images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if images.ndim == 3:  # (N, H, W) grayscale
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DataError(f"DeviceData needs uint8 (N, H, W, C) images with C in {{1, 3}}, got {images.dtype} "
                            f"{images.shape}")
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"DeviceData needs one integer label per image, got {labels.dtype} {labels.shape} for "
                            f"{len(images)} images")
        if int(padding) < 0:
            raise DataError(f"padding={padding} is invalid; fix: use an integer >= 0")
        self.device = torch.device(device)
        self.padding = int(padding)
        if not images.flags.writeable:  # torch cannot wrap read-only numpy memory
            images = images.copy()
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        c = self.images.shape[1]
        mean = tuple(float(m) for m in np.atleast_1d(mean))
        std = tuple(float(s) for s in np.atleast_1d(std))
        if len(mean) != c or len(std) != c:
            raise DataError(f"mean/std need {c} value(s), one per channel; got mean={mean} std={std}")
        self.mean_values, self.std_values = mean, std
        if not dtype.is_floating_point:
            raise DataError(f"dtype={dtype} is invalid; fix: use a floating-point dtype such as torch.float32")
        self.dtype = dtype
        self.mean = torch.tensor(mean, dtype=dtype, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=dtype, device=self.device).view(1, c, 1, 1)
        h, w = self.images.shape[2:]
        self._rows = torch.arange(h, device=self.device)
        self._cols = torch.arange(w, device=self.device)

    @classmethod
    def from_dataset(cls, dataset: ImageDataset, split: str = "train", device="cpu") -> "DeviceData":
        """``DeviceData.from_dataset(ds, "train"|"test", device)``."""
        if split not in ("train", "test"):
            raise DataError(f"split={split!r} is invalid; fix: use 'train' or 'test'")
        return cls(getattr(dataset, f"{split}_images"), getattr(dataset, f"{split}_labels"), dataset.mean,
                   dataset.std, device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------------------------

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> ``(x / 255 - mean) / std`` in ``dtype`` (float32: torchvision's ToTensor +
        Normalize)."""
        return x.to(self.dtype).div_(255).sub_(self.mean).div_(self.std)

    def draw_augmentation(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """On the CPU: ``(offsets (2, n) in [0, 2*padding], flips (n,) in {0, 1})`` for ``n`` samples."""
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator)
        flips = torch.randint(0, 2, (n,), generator=generator)
        return offsets, flips

    def augment(self, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop at ``offsets`` (row, col into the padded image) and flip where ``flips``; returns normalised float32.

        ``idx``, ``offsets`` (2, B) and ``flips`` (B,) must be on this device.
        """
        b = idx.numel()
        c, h, w = self.image_shape
        p = self.padding
        wp = w + 2 * p
        x = self.images[idx]
        if p:
            x = F.pad(x, (p, p, p, p))  # zeros = black pixels, before normalisation (as torchvision on uint8)
        rows = offsets[0].view(b, 1) + self._rows  # (B, H) row in the padded image
        cols = torch.where(flips.view(b, 1).bool(), self._cols.flip(0), self._cols) + offsets[1].view(b, 1)
        flat = (rows.view(b, h, 1) * wp + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
        x = x.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)
        return self.normalise(x)

    def batch(self, idx, augment: bool = False, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(float32 normalised (B, C, H, W), int64 labels (B,))`` of the samples ``idx``.

        With ``augment``, crop offsets and flips are drawn from ``generator`` (a CPU generator; None = torch's global
        one) and moved to the device.
        """
        idx = _as_index(idx)
        dev_idx = idx.to(self.device)
        if not augment:
            return self.normalise(self.images[dev_idx]), self.labels[dev_idx]
        offsets, flips = self.draw_augmentation(idx.numel(), generator)
        return self.augment(dev_idx, offsets.to(self.device), flips.to(self.device)), self.labels[dev_idx]

    def iterate(self, batch_size: int, indices=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In-order, unaugmented batches over ``indices`` (default: the whole split), e.g. for evaluation."""
        _check_batch_size(batch_size)
        idx = torch.arange(len(self), device=self.device) if indices is None else _as_index(indices).to(self.device)
        for start in range(0, idx.numel(), batch_size):
            sel = idx[start : start + batch_size]
            yield self.normalise(self.images[sel]), self.labels[sel]

    def __repr__(self) -> str:
        return (f"DeviceData(n={len(self)}, image_shape={self.image_shape}, device={self.device}, "
                f"mean={self.mean_values}, std={self.std_values})")


def _as_index(idx) -> torch.Tensor:
    if isinstance(idx, torch.Tensor):
        t = idx
    else:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64).reshape(-1))
    if t.dtype not in (torch.int64, torch.int32):
        raise DataError(f"indices must be integers, got {t.dtype}")
    return t.reshape(-1).long()


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r} is invalid; fix: use an integer >= 1")


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded deterministically from integer keys, e.g. ``(seed, round, client)``.

    The keys go through ``numpy.random.SeedSequence``, so (1, 2) and (2, 1) and (1, 2, 0) all give unrelated streams.
    """
    try:
        ints = [int(k) for k in keys]
    except (TypeError, ValueError):
        raise DataError(f"seeded_generator keys must be integers, got {keys!r}") from None
    if any(k < 0 for k in ints) or any(int(k) != k for k in keys):
        raise DataError(f"seeded_generator keys must be integers >= 0, got {keys!r}")
    state = np.random.SeedSequence([len(ints), *ints]).generate_state(2, dtype=np.uint32)  # length: (1,) != (1, 0)
    g = torch.Generator(device="cpu")
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))  # < 2**63
    return g


def client_batches(
    data: DeviceData,
    indices,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    augment: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` for ``epochs`` epochs over the client's ``indices``, reshuffled each epoch.

    Like a DataLoader with ``shuffle=True`` (the last partial batch is kept unless ``drop_last``). Per epoch, the
    permutation, then (with ``augment``) all crop offsets and flips are drawn from the CPU ``generator`` and moved to
    the device in one copy.
    """
    _check_batch_size(batch_size)
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
        raise DataError(f"epochs={epochs!r} is invalid; fix: use an integer >= 0")
    idx = _as_index(indices).cpu()
    n = idx.numel()
    if n == 0:
        return
    n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    for _ in range(int(epochs)):
        order = idx[torch.randperm(n, generator=generator)]
        if augment:
            offsets, flips = data.draw_augmentation(n, generator)
            draws = torch.cat([order.view(1, n), offsets, flips.view(1, n)]).to(data.device)  # one transfer
            order, offsets, flips = draws[0], draws[1:3], draws[3]
        else:
            order = order.to(data.device)
        for b in range(n_batches):
            sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
            sel = order[sl]
            if augment:
                yield data.augment(sel, offsets[:, sl], flips[sl]), data.labels[sel]
            else:
                yield data.normalise(data.images[sel]), data.labels[sel]
