"""How different a generator's samples are from each other, relative to real images: mode collapse shows here.

`pixel_diversity` is the per-pixel standard deviation across a batch, averaged over pixels and
channels (its square is half the mean pairwise squared distance per pixel), so it sees collapse
(every latent giving the same image) and needs no feature extractor. At every log step the loop
reports it for the fixed-noise grid as `diversity`, divided by the same measure of real images taken
through the same data path: about 1 for real images, near 0 when the generator has collapsed
(calibration in docs/results.md). The standard deviation of all pixels pooled together would not
do: a single image with contrast has one too.

`CollapseWatch` turns the ratio into the health monitor's warning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Below this fraction of real images' diversity the samples have collapsed. Calibration (docs/results.md):
# real images 1.0, noise 1.1-1.2, trained generators 0.6-0.8 from a few hundred steps on, a generator at
# initialisation (eval mode) 0.01, collapsed ones 0.0-0.1.
COLLAPSE_BELOW = 0.25


def pixel_diversity(images: torch.Tensor) -> float:
    """Per-pixel standard deviation across the batch (dimension 0), averaged over everything else.

    Takes float images in [-1, 1] or uint8 ones (then scaled to [-1, 1] first), at least two.
    """
    if images.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 images, got {images.shape[0]}")
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 127.5 - 1.0
    return float(x.std(dim=0).mean())


class CollapseWatch:
    """`diversity` of the fixed-noise grid relative to real images, and a warning when it collapses.

    The warning comes once per collapse (again only after the samples recovered) and not while the
    generator has never been diverse yet: at initialisation, in eval mode, every latent gives nearly
    the same grey image, which is a start, not a collapse. A generator still that uniform after
    `min_steps` steps is reported too (the classic recipe's reach 0.3 within about 100 steps).
    """

    def __init__(
        self,
        real_images: torch.Tensor,
        warn: Callable[[str], None],
        threshold: float = COLLAPSE_BELOW,
        min_steps: int = 1000,
    ) -> None:
        self.real = pixel_diversity(real_images)
        self.warn, self.threshold, self.min_steps = warn, threshold, min_steps
        self.was_diverse = False
        self.warned = False

    def observe(self, images: torch.Tensor, step: int) -> float:
        """The ratio for this grid; warns (see the class) when the samples have collapsed."""
        ratio = pixel_diversity(images) / max(self.real, 1e-8)
        if ratio >= self.threshold:
            self.was_diverse, self.warned = True, False
            return ratio
        if not self.warned and (self.was_diverse or step >= self.min_steps):
            self.warned = True
            self.warn(
                f"warning: the fixed-noise samples have collapsed at step {step}: their diversity is {ratio:.2f} "
                f"of real images' (below {self.threshold}); the generator gives nearly the same image for every "
                "latent. Look at the grids; a lower train.lr or resuming an earlier checkpoint usually helps"
            )
        return ratio
