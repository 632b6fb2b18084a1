"""Bundled inputs: scikit-learn's digits as 16x16 images with one fixed split, and the committed weights.

Why these choices:
- sklearn ships the 1797 8x8 images inside the package, so training and tests never touch a network.
- Upsampling is bilinear (not nearest): nearest would make every 2x2 patch of a patch-size-2 DiT exactly
  constant, i.e. a disguised 8x8 model whose tokens are trivially mergeable/cacheable. Bilinear images
  have real structure at 16x16, so speed/fidelity trade-offs measured on them mean something.
- The split is stratified and drawn with numpy's legacy `RandomState`, whose stream numpy keeps stable
  across versions (unlike `train_test_split`, whose internals may change between sklearn releases).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the first 20% of a seeded permutation is held out; the rest is train."""
    rng = np.random.RandomState(SPLIT_SEED)
    train, held = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * HELD_OUT_FRACTION))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 16, 16) in [0, 1] (float32) and labels (N,) (int64) of "train", "held_out" or "all"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    if split == "all":
        idx = np.arange(len(labels))
    elif split in ("train", "held_out"):
        idx = _split_indices(labels)[0 if split == "train" else 1]
    else:
        raise ValueError(f"unknown split {split!r}: expected 'train', 'held_out' or 'all'")
    x = torch.from_numpy(digits.images[idx].astype(np.float32) / 16.0).unsqueeze(1)  # raw values are 0..16
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(labels[idx])


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the [-1, 1] range the diffusion model is trained in."""
    return images * 2 - 1


def read_weights(name: str, where: str | Path | None = None) -> bytes:
    """Bytes of a file in `weights/`: from the installed package (works from a wheel) unless `where` (a
    directory or the file itself) is given, as the training script does to evaluate what it just wrote."""
    if where is None:
        return (resources.files("fastdiff.eval.reference") / "weights" / name).read_bytes()
    where = Path(where)
    return (where / name if where.is_dir() else where).read_bytes()
