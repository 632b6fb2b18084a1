"""fastdiff for ComfyUI: training-free acceleration nodes (step caching, CFG skipping, token merging, a target
speedup, a report of what ran), each
MODEL -> MODEL on a clone, through ComfyUI's public patch API only (`fastdiff.integrations.comfyui`).

Install: put this folder under `ComfyUI/custom_nodes/` with the `fastdiff` package installed in ComfyUI's Python.
ComfyUI with the V3 schema (`comfy_api`) loads the nodes from `comfy_entrypoint`; an older one, which has no
`comfy_api`, from `NODE_CLASS_MAPPINGS` (defined only there: ComfyUI takes NODE_CLASS_MAPPINGS over
`comfy_entrypoint` when a module has both).
"""

try:  # the fastdiff package beside this folder when it is not installed (a checkout of the repository)
    import fastdiff  # noqa: F401
except ImportError:
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1]))

from .nodes import NODES, v1, v3

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # ComfyUI before the V3 schema
    ComfyExtension = io = None

if io is not None:
    class FastDiffExtension(ComfyExtension):
        async def get_node_list(self):
            return [v3(node, io) for node in NODES]

    async def comfy_entrypoint():
        return FastDiffExtension()
else:
    NODE_CLASS_MAPPINGS = {node.id: v1(node) for node in NODES}
    NODE_DISPLAY_NAME_MAPPINGS = {node.id: node.display for node in NODES}
