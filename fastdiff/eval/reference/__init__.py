"""Reference models trained by this project on data bundled in installed packages (weights in `weights/`).

    from fastdiff.eval import reference
    pipe = reference.load("ref-unet")              # ClassUNetPipeline, a diffusers DiffusionPipeline
    clf = reference.load_classifier("ref-unet")    # judges its samples; features() for a Fréchet distance
    real = reference.held_out("ref-unet")          # held-out real images at the model's size (Fréchet reference)

- ref-digits: DiTTransformer2DModel, digits 16x16 (1 channel), 10 classes;
- ref-unet: UNet2DConditionModel (class embeddings through cross-attention, as SD's prompt), digits 32x32;
- ref-textures: DiTTransformer2DModel, 32x32 RGB crops of 10 bundled photographs (class = photograph);
- ref-flux: FluxTransformer2DModel by flow matching, digits at 16/24/32 px (ClassFluxPipeline, a FluxPipeline);
- ref-flux-textures: the same recipe on the photograph crops.
"""

from __future__ import annotations

from importlib import import_module

# name -> module with RECIPE and load(); the data set each model learns (and whose classifier judges it)
_MODELS = {"ref-digits": ".digits", "ref-unet": ".unet", "ref-textures": ".textures", "ref-flux": ".flux",
           "ref-flux-textures": ".flux_textures"}
_DATASETS = {"ref-digits": "digits", "ref-unet": "digits", "ref-textures": "textures", "ref-flux": "digits",
             "ref-flux-textures": "textures"}


def names() -> list[str]:
    """Names `load` accepts."""
    return sorted(_MODELS)


def _module(table: dict, name: str):
    if name not in table:
        raise KeyError(f"unknown reference model {name!r}; known: {', '.join(names())}")
    return import_module(table[name], __name__)


def load(name: str, **kwargs):
    """The pipeline of reference model `name`; kwargs go to its loader (device, dtype, weights)."""
    return _module(_MODELS, name).load(**kwargs)


def dataset(name: str) -> str:
    """The data set `name` learns: "digits" or "textures"."""
    _module(_MODELS, name)  # the same KeyError for unknown names
    return _DATASETS[name]


def num_classes(name: str) -> int:
    """Number of classes of `name` (class ids 0 .. num_classes - 1; the null class is num_classes)."""
    from .data import DATASETS

    return DATASETS[dataset(name)]["num_classes"]


def load_classifier(name: str = "ref-digits", **kwargs):
    """The reference classifier that judges `name`'s samples (eval mode); kwargs: device, weights."""
    from .classifier import load_classifier as _load

    return _load(dataset=dataset(name), **kwargs)


def held_out(name: str = "ref-digits"):
    """Held-out real images (N, C, H, W) in [0, 1] at `name`'s size, and their labels: what its samples are
    compared with (Fréchet distance in the classifier's features)."""
    from .data import load_split

    return load_split("held_out", dataset(name), _module(_MODELS, name).RECIPE.size)
