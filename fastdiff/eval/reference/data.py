"""Bundled inputs: the two data sets the reference models learn (one fixed split each), and the committed weights.

- "digits": scikit-learn's 1797 8x8 digits, 10 classes, upsampled to 16x16 (ref-digits) or 32x32 (ref-unet).
- "textures": 32x32 RGB crops of 10 photographs bundled with scikit-learn and scikit-image; the class is the
  photograph a crop comes from.

Why these choices:
- sklearn and scikit-image ship these images inside the packages, so training and tests never touch a network
  (only skimage.data images that are files of the installed package are used, none that pooch fetches).
- Upsampling is bilinear (not nearest): nearest would make every 2x2 patch of a patch-size-2 DiT exactly
  constant, i.e. a disguised 8x8 model whose tokens are trivially mergeable/cacheable. Bilinear images
  have real structure at 16x16, so speed/fidelity trade-offs measured on them mean something.
- Splits are drawn with numpy's legacy `RandomState`, whose stream numpy keeps stable across versions (unlike
  `train_test_split`, whose internals may change between sklearn releases). Digits: stratified, per class 20%
  held out. Textures: spatial — a quarter of each photograph's 40x40 blocks is held out (held-out crops lie inside
  them, training crops touch none of their pixels), so held-out crops show parts of the scene no training crop
  overlaps, spread over the whole photograph.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16  # digits' default side
NUM_CLASSES = 10
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2

# textures: (package, image) per class; every one is a file inside the installed package
TEXTURES = (("sklearn", "china.jpg"), ("sklearn", "flower.jpg"), ("skimage", "astronaut"), ("skimage", "coffee"),
            ("skimage", "chelsea"), ("skimage", "rocket"), ("skimage", "hubble_deep_field"),
            ("skimage", "immunohistochemistry"), ("skimage", "brick"), ("skimage", "gravel"))
TEXTURE_SIZE = 32  # crop side
TEXTURE_SCALE = 160  # every photograph is first reduced (box filter) to this shorter side: a crop shows a part of it
TEXTURE_BLOCK = 40  # the split's unit: photographs are tiled in 40x40 blocks ...
TEXTURE_HELD_OUT = 0.25  # ... and this fraction of each photograph's blocks (at least 1) is held out
TEXTURE_TRAIN_CROPS = 1000  # per class, random positions of crops that touch no held-out pixel (fixed by SPLIT_SEED)
TEXTURE_STRIDE = 4  # held-out crops: every position on this grid whose crop lies inside held-out blocks only

DATASETS = {"digits": dict(channels=1, size=SIZE, num_classes=NUM_CLASSES),
            "textures": dict(channels=3, size=TEXTURE_SIZE, num_classes=len(TEXTURES))}


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


def load_split(split: str = "train", dataset: str = "digits", size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, size, size) in [0, 1] (float32) and labels (N,) (int64) of "train", "held_out" or "all".

    `size`: digits are upsampled to it from their 8x8 scans (default 16); textures are 32x32 crops, reduced to a
    smaller size by antialiased bilinear resampling (what a model trained at several resolutions sees)."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"unknown split {split!r}: expected 'train', 'held_out' or 'all'")
    if dataset == "textures":
        if size is not None and not 0 < size <= TEXTURE_SIZE:
            raise ValueError(f"textures are {TEXTURE_SIZE}x{TEXTURE_SIZE} crops (or smaller), got size={size}")
        x, y = _texture_split(split)
        if size not in (None, TEXTURE_SIZE):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return x, y
    if dataset != "digits":
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {sorted(DATASETS)}")
    return _digits_split(split, size or SIZE)


def _digits_split(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    if split == "all":
        idx = np.arange(len(labels))
    else:
        idx = _split_indices(labels)[0 if split == "train" else 1]
    x = torch.from_numpy(digits.images[idx].astype(np.float32) / 16.0).unsqueeze(1)  # raw values are 0..16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(labels[idx])


def texture_images() -> list[np.ndarray]:
    """The photographs of TEXTURES as (H, W, 3) float32 arrays in [0, 1], shorter side TEXTURE_SCALE."""
    from PIL import Image

    out = []
    for package, name in TEXTURES:
        if package == "sklearn":
            from sklearn.datasets import load_sample_image

            img = load_sample_image(name)
        else:
            import skimage.data

            img = getattr(skimage.data, name)()
        img = np.asarray(img)
        if img.ndim == 2:  # grey textures: the same value in the three channels
            img = np.repeat(img[..., None], 3, axis=2)
        h, w = img.shape[:2]
        k = TEXTURE_SCALE / min(h, w)
        img = Image.fromarray(img[..., :3]).resize((round(w * k), round(h * k)), Image.Resampling.BOX)
        out.append(np.asarray(img, dtype=np.float32) / 255.0)
    return out


def _texture_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.RandomState(SPLIT_SEED)
    s, crops, labels = TEXTURE_SIZE, [], []
    for c, img in enumerate(texture_images()):
        h, w = img.shape[:2]
        rows, cols = h // TEXTURE_BLOCK, w // TEXTURE_BLOCK
        held = rng.permutation(rows * cols)[:max(1, round(rows * cols * TEXTURE_HELD_OUT))]
        mask = np.zeros((h, w), bool)  # held-out pixels (the ragged right/bottom margin stays train)
        for b in held:
            y, x = divmod(int(b), cols)
            mask[y * TEXTURE_BLOCK:(y + 1) * TEXTURE_BLOCK, x * TEXTURE_BLOCK:(x + 1) * TEXTURE_BLOCK] = True
        inside = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # held-out pixels per s x s window, by position
        count = inside[s:, s:] - inside[:-s, s:] - inside[s:, :-s] + inside[:-s, :-s]
        train_pos = np.argwhere(count == 0)
        pick = train_pos[rng.randint(0, len(train_pos), TEXTURE_TRAIN_CROPS)]  # drawn for every split: same stream
        pos = []
        if split in ("train", "all"):
            pos += [tuple(p) for p in pick]
        if split in ("held_out", "all"):
            inner = np.argwhere(count == s * s)
            pos += [tuple(p) for p in inner if p[0] % TEXTURE_STRIDE == 0 and p[1] % TEXTURE_STRIDE == 0]
        crops += [img[y:y + s, x:x + s] for y, x in pos]
        labels += [c] * len(pos)
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


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
