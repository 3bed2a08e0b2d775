"""Image classification data sets, held as uint8 tensors on the training device.

Images stay uint8 (``N × C × H × W``) on the device and are scaled to floats one batch at a time
(:meth:`Dataset.batch`), so a whole data set costs one byte per pixel of device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Dataset:
    """Training and held-out images with their labels.

    Attributes
    ----------
    name : str
    train_images, test_images : Tensor of uint8, shape (N, C, H, W)
    train_labels, test_labels : Tensor of int64, shape (N,)
    scale : float
        Pixel values are multiplied by this to give activity in [0, 1].
    n_classes : int
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    scale: float
    n_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])

    def to(self, device) -> "Dataset":
        """The same data on ``device`` (still uint8)."""
        move = lambda t: t.to(device)
        return Dataset(self.name, move(self.train_images), move(self.train_labels), move(self.test_images), move(self.test_labels), self.scale, self.n_classes)

    def batch(self, images: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Select ``images[index]`` and scale it to floating point on its device."""
        return images[index].to(dtype) * self.scale


def load_digits(test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8×8 handwritten digits (1,797 images, shipped with scikit-learn).

    A fixed ``test_fraction`` of the images, chosen by a fixed permutation that does not depend
    on any run's seed, is held out as the test set.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 1 / 16, 10)


LOADERS = {"digits": load_digits}


def load_dataset(name: str, **options) -> Dataset:
    """Load a data set by name (one of :data:`LOADERS`)."""
    if name not in LOADERS:
        raise ValueError(f"dataset: unknown data set {name!r}; available: {sorted(LOADERS)}")
    return LOADERS[name](**options)
