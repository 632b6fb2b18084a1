"""Reference models trained by this project on data bundled in installed packages (weights in `weights/`).

    from fastdiff.eval import reference
    pipe = reference.load("ref-digits")            # DigitsPipeline, a diffusers DiffusionPipeline
    clf = reference.load_classifier("ref-digits")  # judges its samples; features() for a Fréchet distance
"""

from __future__ import annotations

from importlib import import_module

# name -> module with load(); name -> module with load_classifier() (the judge of its samples).
# (Not `classifier()`: the submodule of that name would shadow it once imported.)
_MODELS = {"ref-digits": ".digits"}
_CLASSIFIERS = {"ref-digits": ".classifier"}


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


def load_classifier(name: str = "ref-digits", **kwargs):
    """The reference classifier that judges `name`'s samples (eval mode)."""
    return _module(_CLASSIFIERS, name).load_classifier(**kwargs)
