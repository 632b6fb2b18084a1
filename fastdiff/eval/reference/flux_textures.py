"""`ref-flux-textures`: `ref-flux`'s recipe (see `flux.py`) on the RGB photograph crops of `ref-textures`, where the
full 32 px holds detail that a 16 px stage does not: the hard case for resolution-bottleneck sampling.

    python -m fastdiff.eval.reference.train --model ref-flux-textures --steps 1500 --batch-size 32 --lr 7e-4
"""

from __future__ import annotations

from .flux import flux_recipe

# width 96 (2.3 M parameters), 1500 steps: what the shared 2-core machine could train beside ref-flux
RECIPE = flux_recipe("ref-flux-textures", "textures", width=96)
load = RECIPE.load
