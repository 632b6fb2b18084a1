"""`ref-textures`: a class-conditional DiT trained by this project on 32x32 RGB crops of 10 bundled photographs.

The class is the photograph a crop comes from (scikit-learn's china and flower, scikit-image's astronaut, coffee,
chelsea, rocket, hubble_deep_field, immunohistochemistry, brick, gravel; see `data.py`), so the texture classifier
trained on held-out crops judges whether a sample still looks like its photograph: colour, texture, structure.
Same pipeline and CFG layout as `ref-digits` (a stock `DiTTransformer2DModel` through `ClassDiTPipeline`), on
3-channel images; the sampler spaces its timesteps as SD pipelines do (see `recipe.py`).
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel

from .data import DATASETS, TEXTURE_SIZE
from .digits import dit_describe, dit_predict
from .pipelines import ClassDiTPipeline
from .recipe import LEADING_SCHEDULER_CONFIG, LINSPACE_ABLATION, Recipe

NAME = "ref-textures"

# The CPU-trainable version (one thread, under 30 min).
TRANSFORMER_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3, num_layers=6,
    sample_size=TEXTURE_SIZE, patch_size=4, num_embeds_ada_norm=DATASETS["textures"]["num_classes"],
    norm_type="ada_norm_zero",
)

RECIPE = Recipe(
    name=NAME, dataset="textures", size=TEXTURE_SIZE, parts={"transformer": TRANSFORMER_CONFIG},
    build=lambda cfg: {"transformer": DiTTransformer2DModel.from_config(dict(cfg["transformer"]))},
    predict=dit_predict,
    pipeline=lambda parts, scheduler: ClassDiTPipeline(parts["transformer"], scheduler),
    describe=dit_describe,
    scheduler=LEADING_SCHEDULER_CONFIG,  # SD's timestep spacing: see recipe.py
    ablation=LINSPACE_ABLATION,
)
load = RECIPE.load
