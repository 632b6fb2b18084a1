"""A small CNN that recognises the 16x16 digits: the judge of generated samples and the feature extractor
for a Fréchet distance. Trained on the train split only (see `train_digits.py`); weights are committed.

Input everywhere is what `DigitsPipeline` returns with output_type="pt": (N, 1, 16, 16) images in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import read_weights

WEIGHTS = "ref-digits-classifier.safetensors"
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """conv-conv-pool-conv-pool, then a 128-d penultimate layer (`features`) and a linear head (`logits`)."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Dropout(0.3),  # ~1400 training images: without it the head memorises them
            nn.Linear(2 * width * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 128), the space a Fréchet distance is measured in."""
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


def load_classifier(device="cpu", weights: str | Path | None = None) -> DigitsClassifier:
    """The committed classifier (eval mode), or one read from `weights` (a directory or a file)."""
    from safetensors.torch import load as load_bytes

    with torch.random.fork_rng(devices=[]):  # construction draws initial weights; leave the caller's RNG alone
        model = DigitsClassifier()
    model.load_state_dict(load_bytes(read_weights(WEIGHTS, weights)))
    return model.eval().to(device)
