"""Standard data augmentation (zoom, shift, reflection), random per image, on whole batches.

Each image of a batch gets its own random affine map, and the batch is resampled in one
``grid_sample`` call on the device that holds it: no Python loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agrel_sim.config import check_instance, is_count, is_fraction, shown


@dataclass(frozen=True)
class Augmentation:
    """Settings of the augmentation.

    Parameters
    ----------
    factor : int
        How many randomly transformed copies of each training image one epoch presents (the
        paper's "10×" augmentation is ``factor = 10``).
    zoom : float
        Images are scaled by a factor drawn uniformly from ``[1 - zoom, 1 + zoom]``.
    shift : float
        Images are shifted (after the zoom) by up to this fraction of their width and height,
        each direction drawn uniformly.
    flip : bool
        Reflect left-right with probability 1/2 (the default, for photographs such as CIFAR's;
        set False for digits and characters, whose mirror images are not of their class).
    """

    factor: int = 10
    zoom: float = 0.1
    shift: float = 0.1
    flip: bool = True

    def __post_init__(self):
        if not is_count(self.factor):
            raise ValueError(f"augmentation.factor: expected an integer >= 1, got {shown(self.factor, count=True)}")
        for key in ("zoom", "shift"):
            if not is_fraction(getattr(self, key)):
                raise ValueError(f"augmentation.{key}: expected a fraction in [0, 1), got {shown(getattr(self, key))}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"augmentation.flip: expected true or false, got {self.flip!r}")


def augment(images: torch.Tensor, settings: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Transform each image of a float batch ``(B, C, H, W)`` by its own random zoom, shift and reflection.

    Pixels that come from outside the image repeat its border (as Keras' ``fill_mode="nearest"``).

    Parameters
    ----------
    images : torch.Tensor
        The batch, scaled (floating point), ``(B, C, H, W)``.
    settings : Augmentation
        The largest zoom and shift, and whether to reflect half the images left to right.
    generator : torch.Generator
        Draws each image's transform; on the device of ``images``.

    Returns
    -------
    torch.Tensor
        The transformed batch, of the shape, dtype and device of ``images``.

    Raises
    ------
    ValueError
        For ``images`` that are not a 4-dimensional tensor.
    TypeError
        For integer ``images``.
    """
    check_instance("settings", settings, Augmentation)
    if not (isinstance(images, torch.Tensor) and images.dim() == 4):
        shown_images = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: augment expects a batch of images (B, C, H, W), got {shown_images}")
    if not images.is_floating_point():
        raise TypeError(f"images: augment expects a floating-point batch (scale integer pixels first), got {images.dtype}")
    batch = images.shape[0]

    def uniform():  # in [-1, 1), one per image
        return torch.rand(batch, generator=generator, device=images.device, dtype=images.dtype) * 2 - 1

    # affine_grid maps output coordinates to input coordinates in [-1, 1]: a scale below 1 zooms in.
    scale = 1 / (1 + settings.zoom * uniform())
    mirror = torch.where(uniform() < 0, -1.0, 1.0).to(images.dtype) if settings.flip else torch.ones_like(scale)
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = scale * mirror
    theta[:, 1, 1] = scale
    # The shift is scaled like the output coordinates, so that it moves the zoomed image by at
    # most `shift` of its size whatever the zoom.
    theta[:, 0, 2] = 2 * settings.shift * uniform() * scale * mirror
    theta[:, 1, 2] = 2 * settings.shift * uniform() * scale
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
