"""Small CNNs that recognise a data set's classes: the judges of generated samples and the feature extractors
for a Fréchet distance. Trained on the train split only (see `train.py`); weights are committed.

- "digits" (ref-digits, ref-unet): (N, 1, 16, 16) input; ref-unet's 32x32 samples are reduced to 16x16 first.
- "textures" (ref-textures): (N, 3, 32, 32) input; which of the 10 photographs a crop comes from.

Input everywhere is what the reference pipelines return with output_type="pt": images in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import DATASETS, read_weights

FEATURE_DIM = 128
WEIGHTS = "ref-digits-classifier.safetensors"  # the digits classifier's file
FILES = {"digits": WEIGHTS, "textures": "ref-textures-classifier.safetensors"}


class ReferenceClassifier(nn.Module):
    """conv-conv-pool-conv-pool, then a 128-d penultimate layer (`features`) and a linear head (`logits`)."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1, size: int = 16):
        super().__init__()
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # size / 2
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # size / 4
            nn.Flatten(),
            nn.Dropout(0.3),  # ~1400 training digits: without it the head memorises them
            nn.Linear(2 * width * (size // 4) ** 2, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 128), the space a Fréchet distance is measured in. Larger images (a 32x32
        digit) are reduced to the classifier's size by area averaging first."""
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="area")
        return self.body(images * 2 - 1)  # centred input; callers pass [0, 1]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    forward = logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class per image, in batches, in eval mode."""
        was = self.training
        self.eval()
        try:
            return torch.cat([self.logits(b).argmax(1) for b in images.split(batch_size)])
        finally:
            self.train(was)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images classified as their label."""
        return (self.predict(images) == labels.to(images.device)).float().mean().item()


DigitsClassifier = ReferenceClassifier  # the digits classifier is the default shape


def build_classifier(dataset: str = "digits") -> ReferenceClassifier:
    """A freshly initialised classifier for `dataset`."""
    d = DATASETS[dataset]
    return ReferenceClassifier(num_classes=d["num_classes"], in_channels=d["channels"], size=d["size"])


def load_classifier(device="cpu", weights: str | Path | None = None, dataset: str = "digits") -> ReferenceClassifier:
    """The committed classifier of `dataset` (eval mode), or one read from `weights` (a directory or a file)."""
    from safetensors.torch import load as load_bytes

    with torch.random.fork_rng(devices=[]):  # construction draws initial weights; leave the caller's RNG alone
        model = build_classifier(dataset)
    model.load_state_dict(load_bytes(read_weights(FILES[dataset], weights)))
    return model.eval().to(device)
