"""ControlNetModel (SD1.x/2.x, SDXL ControlNets): a control network the pipeline runs beside the UNet every step.

fastdiff does not accelerate it (its residuals feed every UNet level), but a summary that left it out would
overstate the pipeline's speedup: its calls are recorded and priced as dense work. Its blocks are the UNet's
down and mid blocks; each down residual gets a 1x1 `controlnet_down_blocks.j` at that residual's level.
"""

import re

from .base import FamilySpec, register, tensor_layout
from .unet import SPEC as UNET
from .unet import _grid
from .unet import _level as _unet_level


def _residual_levels(net) -> list[int]:
    """Level of each down residual, in order: conv_in's output, then every resnet and downsampler."""
    levels = [0]
    for i, block in enumerate(net.down_blocks):
        levels += [i] * len(block.resnets)
        if getattr(block, "downsamplers", None) is not None:
            levels.append(i + 1)
    return levels


def _level(path, net):
    m = re.match(r"controlnet_down_blocks\.(\d+)", path)
    if m is not None:
        return _residual_levels(net)[int(m.group(1))]
    if path.startswith("controlnet_mid_block"):
        return len(net.down_blocks) - 1
    return _unet_level(path, net)  # the conditioning embedder is priced at the latent grid (a small share)


SPEC = register(FamilySpec(
    name="controlnet",
    classes=("ControlNetModel",),
    block_lists=UNET.block_lists[:2],  # the UNet's down and mid blocks
    hidden_arg="sample",
    layout=tensor_layout("BCHW", _grid, "cross", hidden_arg="sample"),
    latent_grid=_grid,
    streams=UNET.streams,
    level=_level,
    text_tokens=77,
    text_position="cross",
    control=True,
))
