"""Sample quality: FID / IS / KID and their feature extractors."""

from trainer.quality import classifier as _classifier  # registers `cifar10-classifier` with torch-fidelity

del _classifier
