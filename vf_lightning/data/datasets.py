"""In-memory image datasets with tensor transforms (fast on CPU: no PIL round trip)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class TensorImageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """uint8 images ``N×C×H×W`` + labels, normalized on access, with optional crop/flip augmentation.

    ``pad_to`` zero-pads (in normalized space) to a square size, e.g. 28→32; ``crop_padding`` > 0
    enables random-crop augmentation with that padding, ``flip`` random horizontal flips.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        pad_to: int | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        index: torch.Tensor | None = None,
    ) -> None:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"TensorImageDataset expects uint8 N×C×H×W images, got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(c, 1, 1)
        self.pad_to = pad_to
        self.crop_padding = crop_padding
        self.flip = flip
        self.index = index if index is not None else torch.arange(len(labels))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._batch([i])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A loader batch in one go (the ``DataLoader`` calls this instead of ``__getitem__`` per sample):
        normalization, padding and augmentation run once on the whole batch."""
        x, y = self._batch(indices)
        return list(zip(x.unbind(0), y.unbind(0)))

    def _batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.index[torch.as_tensor(indices, dtype=torch.long)]
        x = (self.images[j].float().div_(255.0) - self.mean) / self.std
        if self.pad_to is not None and x.shape[-1] < self.pad_to:
            p = self.pad_to - x.shape[-1]
            x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))
        if self.crop_padding > 0:
            p = self.crop_padding
            h, w = x.shape[-2:]
            xp = F.pad(x, (p, p, p, p))
            offsets = torch.randint(0, 2 * p + 1, (len(j), 2)).tolist()
            x = torch.stack([xp[k, :, top:top + h, left:left + w] for k, (top, left) in enumerate(offsets)])
        if self.flip:
            x = torch.where((torch.rand(len(j)) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[j]

    def subset(self, index: torch.Tensor, augment: bool | None = None) -> TensorImageDataset:
        """A view on the rows ``index`` (relative to this dataset), optionally without augmentation."""
        aug = augment if augment is not None else (self.crop_padding > 0 or self.flip)
        return TensorImageDataset(
            self.images,
            self.labels,
            self.mean.flatten().tolist(),
            self.std.flatten().tolist(),
            self.pad_to,
            self.crop_padding if aug else 0,
            self.flip if aug else False,
            self.index[index],
        )


def select_classes(labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of samples whose label is in ``classes`` and their labels remapped to ``0..len(classes)-1``."""
    lut = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    for new, old in enumerate(classes):
        if old < 0 or old >= len(lut):
            raise ValueError(f"class {old} does not exist (labels go from 0 to {len(lut) - 1})")
        lut[old] = new
    keep = lut[labels.long()] >= 0
    idx = keep.nonzero().flatten()
    return idx, lut[labels.long()]
