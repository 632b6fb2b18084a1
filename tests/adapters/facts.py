"""Family facts the tests branch on, read from where they are true: the family's adapter (what fastdiff knows about
the model) or its test-model record (`fastdiff.eval.tiny`: what the tiny model is). A new family brings its facts
with its adapter file and its record; no test lists family names for them."""

from fastdiff.adapters.base import specs
from fastdiff.eval import tiny

FAMILIES = tiny.FAMILIES


def spec_of(denoiser_class: str):
    """The adapter registered for a denoiser class name."""
    return next(s for s in specs() if denoiser_class in s.classes)


def todo_supported(spec) -> bool:
    """ToDo: a self-attention whose keys/values may come from other tokens than its queries (the adapter's kv_arg)."""
    return any(m.kv_arg for site in spec.attention for m in site.modules if m.role == "self_attention")


# one denoiser call per CFG branch (true CFG, Wan), from the adapter's CfgLayout for the record's pipeline class
SEPARATE_CFG = frozenset(f for f in FAMILIES if tiny.spec(f).pipelines[tiny.record(f).pipeline].mode == "separate")
# latents with frames (the record's geometry)
VIDEO = frozenset(tiny.VIDEO_FAMILIES)
# blocks on resolution levels (the adapter maps module paths to levels): UNets
UNET = frozenset(f for f in FAMILIES if tiny.spec(f).level is not None)
# blocks a cache replays by their output (DeepCache), not input + residual: only policy static / residual apply
OUTPUT_REUSE = frozenset(f for f in FAMILIES if any(b.reuse == "output" for b in tiny.spec(f).block_lists))
# blocks a step cache must always compute (DeepCache's shallow path)
ALWAYS_COMPUTE = frozenset(f for f in FAMILIES if tiny.spec(f).always_compute is not None)
TODO = frozenset(f for f in FAMILIES if todo_supported(tiny.spec(f)))
