"""Normalisation and training augmentation, batched on the training device.

The train split's exact per-channel statistics (channel_stats) give the normalisation;
BatchAugmenter applies it to whole uint8 batches after they reach the device (4x less to
copy), with random crop, flip and cutout as a handful of vectorised ops on the batch.
default_augmentation holds each data set's standard settings and augmenter_for builds the
augmenter for a bundle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .containers import DataBundle


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0,1] units via 256-bin histograms of the uint8 values."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1).cpu(), minlength=256).to(torch.float64)
        count = hist.sum()
        mean = (hist * values).sum() / count
        var = (hist * (values - mean).square()).sum() / count
        means.append(float(mean) / 255.0)
        # Floor at one grey level: a constant channel would otherwise divide by zero.
        stds.append(max(float(var.sqrt()), 1.0) / 255.0)
    return tuple(means), tuple(stds)


class BatchAugmenter:
    """Batched augmentation on the training device; input uint8 [B,C,H,W] on any device.

    Output is float32 normalised with (x/255 - mean) / std. With train=True it also applies
    a random crop from a zero-padded image (`crop_padding`), a random horizontal flip and
    cutout (a `cutout`-sided square set to 0 after normalisation, clipped at the borders).
    Random numbers come from `generator` (CPU or the images' device) and are moved over.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int = 0,
        flip: bool = False,
        cutout: int = 0,
    ) -> None:
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        if crop_padding < 0 or cutout < 0:
            raise ValueError(f"crop_padding and cutout must be >= 0, got {crop_padding}, {cutout}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.cutout = int(cutout)
        # (x/255 - mean)/std folded into one multiply and one subtract: x*scale - shift.
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(1, -1, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)]).view(
            1, -1, 1, 1
        )

    def __repr__(self) -> str:
        return (
            f"BatchAugmenter(channels={len(self.mean)}, crop_padding={self.crop_padding}, "
            f"flip={self.flip}, cutout={self.cutout})"
        )

    @property
    def augments(self) -> bool:
        """Whether train=True does anything beyond normalisation."""
        return self.crop_padding > 0 or self.flip or self.cutout > 0

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None, train: bool = True
    ) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(self.mean):
            raise ValueError(
                f"expected uint8 [B,{len(self.mean)},H,W] images, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if train and (self.crop_padding or self.flip):
            images = self._crop_flip(images, generator)  # on uint8: 4x less memory traffic
        x = images.to(torch.float32)
        x.mul_(self._scale.to(x.device)).sub_(self._shift.to(x.device))
        if train and self.cutout:
            x = self._cutout(x, generator)
        return x

    def _crop_flip(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, h, w = images.shape
        p, dev = self.crop_padding, images.device
        if p:
            images = F.pad(images, (p, p, p, p))  # zero padding, as black pixels
        top = _randint(2 * p + 1, b, generator, dev)
        left = _randint(2 * p + 1, b, generator, dev)
        rows = top[:, None] + torch.arange(h, device=dev)  # [B, H] source rows
        cols = left[:, None] + torch.arange(w, device=dev)  # [B, W] source columns
        if self.flip:
            # A mirrored crop is the same window read right-to-left: flip the column index.
            flip = _randint(2, b, generator, dev).bool()
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        return images[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]

    def _cutout(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        top = _randint(h, b, generator, dev) - self.cutout // 2  # centre anywhere, then clip
        left = _randint(w, b, generator, dev) - self.cutout // 2
        ys = torch.arange(h, device=dev)
        xs = torch.arange(w, device=dev)
        in_rows = (ys >= top[:, None]) & (ys < top[:, None] + self.cutout)  # [B, H]
        in_cols = (xs >= left[:, None]) & (xs < left[:, None] + self.cutout)  # [B, W]
        return x.masked_fill_(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)


def _randint(
    high: int, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """n ints in [0, high) drawn on the generator's device, returned on `device`."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(high, (n,), generator=generator, device=gen_device).to(device)


def default_augmentation(bundle: DataBundle) -> dict[str, int | bool]:
    """The data set's standard training augmentation: flip, crop padding, cutout side."""
    if hasattr(bundle.train, "stream_batches"):
        # Streamed trees crop in the loader workers (random resized crop, docs/streaming.md).
        return {"flip": True, "crop_padding": 0, "cutout": 0}
    if bundle.name == "fashion-mnist":
        return {"flip": True, "crop_padding": 2, "cutout": 0}
    if bundle.name in ("cifar10", "cifar100"):
        # Cutout sizes from DeVries & Taylor (2017): 16 for CIFAR-10, 8 for CIFAR-100.
        return {"flip": True, "crop_padding": 4, "cutout": 16 if bundle.name == "cifar10" else 8}
    return {"flip": True, "crop_padding": bundle.image_size // 8, "cutout": 0}


def augmenter_for(
    bundle: DataBundle,
    *,
    train: bool,
    flip: bool | None = None,
    crop_padding: int | None = None,
    cutout: int | None = None,
) -> BatchAugmenter:
    """Training augmentation of the bundle (None: the data set's default, see
    ``default_augmentation``); train=False only normalises."""
    if not train:
        return BatchAugmenter(bundle.mean, bundle.std)
    given = {"flip": flip, "crop_padding": crop_padding, "cutout": cutout}
    settings = {
        k: v if given[k] is None else given[k] for k, v in default_augmentation(bundle).items()
    }
    return BatchAugmenter(bundle.mean, bundle.std, **settings)
