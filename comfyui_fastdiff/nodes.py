"""fastdiff's ComfyUI nodes, as data: each `Node` lists its inputs (with tooltips) and the function that patches a
clone of the MODEL (`fastdiff.integrations.comfyui.patch`). `v3(node)` makes the node a ComfyUI V3 `io.ComfyNode`
(ComfyUI with `comfy_api`), `v1(node)` a classic INPUT_TYPES / FUNCTION class (older ComfyUI): one definition
serves both. Settings are fractions of the run's steps, never step counts, so a node works at any step count; a
setting that cannot save anything in a run says so in the log and in the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fastdiff.errors import ConfigError
from fastdiff.integrations import comfyui as host

CATEGORY = "fastdiff"


@dataclass(frozen=True)
class Input:
    """One node input: `kind` is "model", "latent", "float", "int", "combo" or "bool"."""

    name: str
    kind: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Node:
    """A node: id, display name, what it does, its inputs, its outputs ((kind, name, tooltip) each) and `run`
    (the inputs by name -> the outputs, in order)."""

    id: str
    display: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[tuple[str, str, str], ...]
    run: Callable[..., tuple]
    output_node: bool = False


MODEL_IN = Input("model", "model", "The model to accelerate. It is not changed: the node patches a clone.")
MODEL_OUT = (("model", "MODEL", "A clone of the model that runs accelerated when sampled."),)
START = Input("start_percent", "float", "Fraction of the sampling steps always computed first (the image's layout "
              "is decided there); e.g. 0.2 of 20 steps: the first 4.", 0.15, 0.0, 1.0, 0.01)
END = Input("end_percent", "float", "Fraction of the steps after which every step is computed again (fine detail); "
            "1.0: until the last step.", 0.95, 0.0, 1.0, 0.01)


def _cache(model, policy, interval, threshold, estimator, start_percent, end_percent, head_blocks, tail_blocks):
    settings = {"policy": policy, "interval": interval, "threshold": threshold, "estimator": estimator,
                "start": start_percent, "end": end_percent, "head": head_blocks, "tail": tail_blocks}
    return (host.patch(model, "cache", settings),)


def _cfg_skip(model, start_percent, mode, threshold):
    return (host.patch(model, "guidance", {"start": start_percent, "mode": mode, "threshold": threshold}),)


def _merge(model, method, ratio, factor, targets, max_downsample, start_percent, end_percent):
    settings = {"method": method, "ratio": ratio, "factor": factor, "max_downsample": int(max_downsample),
                "targets": TARGETS[targets], "start": start_percent, "stop": end_percent}
    return (host.patch(model, "merge", settings),)


TARGETS = {"self": ["self_attention"], "self+cross": ["self_attention", "cross_attention"]}


def _sparse(model, pattern, density, top_p, window, block, start_percent):
    settings = {"pattern": pattern, "density": density, "top_p": top_p, "window": [1, window, window],
                "block": int(block), "start": start_percent}
    if pattern == "topp":  # pooled means flatten the scores: top-p keeps most blocks without antidiagonal scoring
        settings["method"] = "antidiag"
    return (host.patch(model, "sparse", settings),)


def _bottleneck(scale, low_steps, strength, resize, strength_is, stages=""):
    from comfy.samplers import KSAMPLER  # ComfyUI, only when the node runs

    from fastdiff.integrations.comfyui_sampler import BottleneckSampler, parse_stages

    if stages.strip():
        return (KSAMPLER(BottleneckSampler(parse_stages(_stage_list(stages)), resize, strength_is)),)
    stages = [{"scale": 1, "steps": 1.0, "strength": 1.0}] if scale == 1 else \
        [{"scale": scale, "steps": low_steps, "strength": 1.0}, {"scale": 1, "steps": 1.0 - low_steps,
                                                                "strength": strength}]
    if scale > 1 and not 0 < low_steps < 1:
        raise ConfigError(f"fastdiff Bottleneck Sampler: low_steps must be a fraction in (0, 1) with scale > 1, got "
                         f"{low_steps}")
    return (KSAMPLER(BottleneckSampler(parse_stages(stages), resize, strength_is)),)


def _stage_list(text: str) -> list[dict]:
    """'4:0.3:1, 2:0.3:0.8, 1:0.4:0.7' -> stages (scale:steps fraction:strength each)."""
    out = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            scale, steps, strength = int(fields[0]), float(fields[1]), float(fields[2])
        except (ValueError, IndexError):
            raise ConfigError(f"fastdiff Bottleneck Sampler: stage {part.strip()!r} is not scale:steps:strength "
                              "(e.g. '2:0.6:1, 1:0.4:0.85')") from None
        if len(fields) != 3:
            raise ConfigError(f"fastdiff Bottleneck Sampler: stage {part.strip()!r} is not scale:steps:strength")
        out.append({"scale": scale, "steps": steps, "strength": strength})
    return out


def _accelerate(model, speedup):
    return (host.patch(model, host.ACCELERATE, {"speedup": speedup}),)


def _report(model, latent):
    plan = host.plan_of(model)
    if plan is None:
        text = "fastdiff: this model was not patched by a fastdiff node"
    elif plan.last is None:
        text = "fastdiff: this model has not been sampled yet (connect the sampler's LATENT output here)"
    else:
        text = "\n".join([plan.report, *plan.notes])
    return text, latent


NODES = (
    Node("FastDiffCache", "fastdiff Cache",
         "Step caching: a span of the model's blocks (a UNet: the whole model) is computed at some steps and its "
         "residual reused at the others, under one of fastdiff's policies.",
         (MODEL_IN,
          Input("policy", "combo", "When to reuse: 'static' every interval-th step is computed (FORA / DeepCache); "
                "'easycache' while the predicted output change stays under the threshold (EasyCache); 'residual' "
                "while the first blocks' residual changes less than the threshold (first-block cache; DiTs, needs "
                "head_blocks >= 1); 'delta' Δ-DiT (front blocks cached late, rear blocks early).", "static",
                options=("static", "easycache", "residual", "delta")),
          Input("interval", "int", "static / delta: compute every interval-th step (1 never reuses).", 2, 1, 100, 1),
          Input("threshold", "float", "easycache / residual: accumulated relative change allowed before a step is "
                "computed again; higher skips more (0 never reuses).", 0.2, 0.0, 10.0, 0.01),
          Input("estimator", "combo", "What stands in for a skipped span: 'reuse' the last computed residual, "
                "'taylor' a forecast from the last computed steps (TaylorSeer), 'foca' a predictor-corrector "
                "forecast.", "reuse", options=("reuse", "taylor", "foca")),
          START, END,
          Input("head_blocks", "int", "Blocks at the front always computed (the residual policy reads them).",
                0, 0, 64, 1),
          Input("tail_blocks", "int", "Blocks at the back always computed.", 0, 0, 64, 1)),
         MODEL_OUT, _cache),
    Node("FastDiffSkipCFG", "fastdiff Skip CFG",
         "Late in sampling the negative (unconditional) prediction is stood in for by the positive one minus the "
         "last measured guidance difference, so only the positive cond runs (Adaptive Guidance). Needs cfg > 1.",
         (MODEL_IN,
          Input("start_percent", "float", "Fraction of the steps after which the negative cond is skipped.", 0.5,
                0.0, 1.0, 0.01),
          Input("mode", "combo", "'step' skip from start_percent on; 'converged' only once the positive and "
                "negative predictions agree (cosine similarity >= threshold).", "step", options=("step", "converged")),
          Input("threshold", "float", "converged mode: the cosine similarity the two predictions must reach.", 0.99,
                0.0, 1.0, 0.001)),
         MODEL_OUT, _cfg_skip),
    Node("FastDiffTokenMerge", "fastdiff Token Merge",
         "Token merging on SD1.x / SD2.x / SDXL UNets (ToMe / ToDo, through ComfyUI's attention patches): similar "
         "image tokens are merged before self-attention and unmerged after it, so attention runs on fewer tokens; "
         "the report counts the tokens merged. Other models are refused by name.",
         (MODEL_IN,
          Input("method", "combo", "'tome' merges the most similar image tokens before attention and unmerges its "
                "output (ToMe-SD); 'todo' keeps every query and pools the keys/values factor x factor (ToDo).",
                "tome", options=("tome", "todo")),
          Input("ratio", "float", "tome: fraction of the image tokens merged away (0 merges nothing).", 0.5, 0.0,
                0.9, 0.01),
          Input("factor", "int", "todo: keys/values pooled factor x factor (about 1/factor^2 of the keys).", 2, 2,
                4, 1),
          Input("targets", "combo", "tome: merge around self-attention only, or around cross-attention too.",
                "self", options=tuple(TARGETS)),
          Input("max_downsample", "combo", "Merge at the UNet levels downsampled at most this much relative to "
                "the finest level with attention (1: only the finest, as tomesd; 2, 4, 8: deeper ones too).", "1",
                options=("1", "2", "4", "8")),
          Input("start_percent", "float", "Fraction of the steps from which tokens are merged.", 0.0, 0.0, 1.0, 0.01),
          Input("end_percent", "float", "Fraction of the steps after which every token runs again (fine detail).",
                1.0, 0.0, 1.0, 0.01)),
         MODEL_OUT, _merge),
    Node("FastDiffSparseAttention", "fastdiff Sparse Attention",
         "Block-sparse self-attention (Flux; SD1.x / SD2.x / SDXL UNets), through ComfyUI's attention override: the "
         "image tokens are taken in tiles, and each query block attends only some key blocks (a window around it, "
         "or the ones its pooled scores predict); text tokens always attend and are attended densely. The report "
         "gives the attention density that ran. Other models are refused by name.",
         (MODEL_IN,
          Input("pattern", "combo", "'window': the key tiles within `window` tiles around the query's (Sliding Tile "
                "Attention); 'crisscross': the window plus the query's tile row and column; 'topk': the `density` "
                "share of key blocks with the highest pooled scores; 'topp': the fewest blocks holding `top_p` of "
                "the score mass.", "window", options=("window", "crisscross", "topk", "topp")),
          Input("density", "float", "topk: share of the key blocks each query block keeps (1.0: dense).", 0.25,
                0.01, 1.0, 0.01),
          Input("top_p", "float", "topp: score mass the kept key blocks must hold (1.0: dense).", 0.9, 0.01, 1.0,
                0.01),
          Input("window", "int", "window / crisscross: window side in tiles (odd: centred on the query's tile).", 3,
                1, 15, 2),
          Input("block", "combo", "Tokens per query / key block, the unit of skipped work (a tile holds about "
                "this many tokens).", "64", options=("16", "32", "64", "128", "256")),
          Input("start_percent", "float", "Fraction of the steps run with dense attention first (the layout forms "
                "there).", 0.2, 0.0, 0.99, 0.01)),
         MODEL_OUT, _sparse),
    Node("FastDiffBottleneckSampler", "fastdiff Bottleneck Sampler",
         "Resolution-bottleneck sampling for flow-matching models (Flux, SD3, Wan), as a SAMPLER for SamplerCustom "
         "/ SamplerCustomAdvanced: the first steps run on a latent `scale` times smaller (fewer tokens), then the "
         "clean estimate is upscaled and re-noised to `strength`, and the last steps run at full size. Each stage's "
         "sigmas come from the model's own sampling rule (its shift adjusted to the stage's size for Flux); the "
         "scheduler's sigmas give the step count. The output has the full size; the console shows the stages.",
         (Input("scale", "int", "Latent downscale of the first stage (2: half the height and width, a quarter of "
                "the tokens); 1: one full-size stage (ComfyUI's Euler).", 2, 1, 4, 1),
          Input("low_steps", "float", "Fraction of the steps run at low resolution.", 0.6, 0.05, 0.95, 0.01),
          Input("strength", "float", "Noise level the full-size stage starts from after upscaling (1: pure noise; "
                "lower keeps more of the low-resolution image).", 0.85, 0.05, 1.0, 0.01),
          Input("resize", "combo", "How the clean estimate is upscaled between stages.", "bicubic",
                options=("bicubic", "bilinear", "area", "lanczos")),
          Input("strength_is", "combo", "'time': the strength is shifted like a timestep (Bottleneck Sampling's "
                "rule); 'sigma': the full-size stage starts at exactly that noise level.", "time",
                options=("time", "sigma")),
          Input("stages", "string", "Optional, more stages: scale:steps:strength each, comma separated, steps as "
                "fractions of the run (e.g. '4:0.3:1, 2:0.3:0.8, 1:0.4:0.7'); when set it replaces scale, "
                "low_steps and strength. The first starts at strength 1, the last at scale 1.", "")),
         (("sampler", "SAMPLER", "The sampler: connect it to SamplerCustom / SamplerCustomAdvanced."),),
         _bottleneck),
    Node("FastDiffAccelerate", "fastdiff Accelerate",
         "A target speedup instead of settings: at each run fastdiff's planner picks, from the settings measured "
         "on its reference models, the caching and CFG-skipping with the most expected fidelity whose predicted "
         "cost is at most 1/speedup of the plain model's, for that run's steps and size. Mechanisms set by other "
         "fastdiff nodes on this model are kept and planned around. A target out of reach stops the run, naming "
         "the reachable range.",
         (MODEL_IN,
          Input("speedup", "float", "Wanted speedup over the plain model in predicted compute (FLOPs), e.g. 2.0; "
                "the report says what was chosen and the speedup that ran.", 2.0, 1.0, 100.0, 0.05)),
         MODEL_OUT, _accelerate),
    Node("FastDiffReport", "fastdiff Report",
         "What fastdiff did in the model's last sampling run: steps computed / skipped, tokens, estimated speedup. "
         "Connect the sampler's LATENT output so it runs after sampling; the latent passes through.",
         (Input("model", "model", "The model a fastdiff node returned (the one given to the sampler)."),
          Input("latent", "latent", "The sampler's output: ties the report to after the run; passed through.")),
         (("string", "report", "The report as text."), ("latent", "LATENT", "The latent, unchanged.")),
         _report, output_node=True),
)


# -- ComfyUI V3 (comfy_api) -----------------------------------------------------------------------------
def v3(node: Node, io) -> type:
    """`node` as a V3 `io.ComfyNode` class."""
    kinds = {"model": io.Model, "latent": io.Latent, "float": io.Float, "int": io.Int, "combo": io.Combo,
             "bool": io.Boolean, "string": io.String, "sampler": io.Sampler}

    def make_input(i: Input):
        kw: dict[str, Any] = {"tooltip": i.tooltip}
        if i.default is not None:
            kw["default"] = i.default
        if i.kind == "combo":
            kw["options"] = list(i.options)
        for key in ("min", "max", "step"):
            if getattr(i, key) is not None:
                kw[key] = getattr(i, key)
        return kinds[i.kind].Input(i.name, **kw)

    def define_schema(cls):
        return io.Schema(node_id=node.id, display_name=node.display, category=CATEGORY, description=node.description,
                         inputs=[make_input(i) for i in node.inputs],
                         outputs=[kinds[k].Output(display_name=n, tooltip=t) for k, n, t in node.outputs],
                         is_output_node=node.output_node)

    def execute(cls, **inputs):
        out = node.run(**inputs)
        if node.output_node:
            return io.NodeOutput(*out, ui={"text": [out[0]]})
        return io.NodeOutput(*out)

    return type(node.id, (io.ComfyNode,), {"define_schema": classmethod(define_schema),
                                           "execute": classmethod(execute), "__doc__": node.description})


# -- older ComfyUI (NODE_CLASS_MAPPINGS) ------------------------------------------------------------------
V1_TYPES = {"model": "MODEL", "latent": "LATENT", "float": "FLOAT", "int": "INT", "bool": "BOOLEAN",
            "string": "STRING", "sampler": "SAMPLER"}


def v1(node: Node) -> type:
    """`node` as a classic ComfyUI node class (INPUT_TYPES, RETURN_TYPES, FUNCTION)."""

    def input_types(cls):
        required = {}
        for i in node.inputs:
            opts: dict[str, Any] = {"tooltip": i.tooltip}
            if i.default is not None:
                opts["default"] = i.default
            for key in ("min", "max", "step"):
                if getattr(i, key) is not None:
                    opts[key] = getattr(i, key)
            required[i.name] = (list(i.options), opts) if i.kind == "combo" else (V1_TYPES[i.kind], opts)
        return {"required": required}

    def run(self, **inputs):
        out = node.run(**inputs)
        return {"ui": {"text": [out[0]]}, "result": out} if node.output_node else out

    return type(node.id, (), {
        "INPUT_TYPES": classmethod(input_types), "RETURN_TYPES": tuple(V1_TYPES[k] for k, _, _ in node.outputs),
        "RETURN_NAMES": tuple(n for _, n, _ in node.outputs), "OUTPUT_TOOLTIPS": tuple(t for _, _, t in node.outputs),
        "FUNCTION": "run", "run": run, "CATEGORY": CATEGORY, "DESCRIPTION": node.description,
        "OUTPUT_NODE": node.output_node, "__doc__": node.description})
