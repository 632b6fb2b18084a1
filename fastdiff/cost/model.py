"""Analytic cost of a denoiser: FLOPs of every matmul/conv as a function of the token layout.

Walking the denoiser once, each nn.Linear / nn.ConvNd becomes a term "coef × tokens of its stream"
(the family adapter says which tokens a layer sees: image, text, both, or once per sample), and each
attention module (anything with `to_q`/`to_k` linears) a term "4 × Nq × Nk × inner width". Elementwise
ops and norms are left out, as torch's FlopCounterMode leaves them out. Evaluation is pure arithmetic,
so the planner can price any resolution, text length or token/sparsity reduction without running.

Token reductions (merging) and sparse attention are priced per submodule:
`block_flops(layout, {path: Reduction(...)})` counts every term under `path` at the reduced number of image
tokens — queries and per-token layers at `Reduction.query`, key/value projections and attention keys at
`Reduction.keys`, attention pairs times `Reduction.density` — plus `Reduction.extra`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field

import torch

from ..adapters.base import GLOBAL, IMAGE, JOINT, TEXT, BlockAdapter
from ..context import TokenLayout, level_grid
from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class Reduction:
    """The image tokens one submodule runs on per sample, instead of the full grid at its level.

    Args:
        query: image tokens its queries and per-token layers (projections, MLP) see.
        keys: image tokens its keys and values come from (`to_k`/`to_v` inputs, attention keys).
        extra: FLOPs spent on top for the reduction itself (e.g. the similarity matmul of a token matching).
        density: fraction of the (query, key) pairs its attention computes (block-sparse attention); 1 = dense.
    """

    query: int
    keys: int
    extra: float = 0.0
    density: float = 1.0


KV_PROJECTIONS = (".to_k", ".to_v")  # linears that see the keys' tokens (ToDo pools only these)


@dataclass(frozen=True)
class Term:
    """One matmul-like op of the denoiser.

    Args:
        path: module path.
        block: index of the adapter block holding it, or None (embedders, final layers).
        kind: "linear", "conv" or "attention".
        coef: FLOPs per output position (linear/conv); 4 × inner width (attention).
        stream: tokens a linear/conv runs on.
        level: UNet resolution level of the output (0 for transformers).
        q_streams / kv_streams: token streams of the queries and keys (attention).
    """

    path: str
    block: int | None
    kind: str
    coef: float
    stream: str = IMAGE
    level: int = 0
    q_streams: tuple[str, ...] = ()
    kv_streams: tuple[str, ...] = ()


def tokens(stream: str, layout: TokenLayout, level: int = 0, image: int | None = None) -> int:
    """Number of rows a layer on `stream` processes per sample; `image` overrides the image tokens (merging)."""
    if stream == GLOBAL:
        return 1
    if stream == TEXT:
        return layout.text_tokens
    if image is None:
        image = math.prod(level_grid(layout.grid, level))
    return image + layout.text_tokens if stream == JOINT else image


@dataclass
class CostModel:
    """FLOPs of one denoiser call per block, from the adapter's data; no forward is run."""

    adapter: BlockAdapter
    terms: list[Term] = field(default_factory=list)
    _under_cache: dict[str, list[Term]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        spec = self.adapter.spec
        if spec.layout is None:
            raise UnsupportedModelError(
                f"{type(self.adapter.denoiser).__name__}: the cost model needs the token layout, which the auto "
                f"fallback adapter does not know; supported families: {sorted(_families())}"
            )
        owners = [(b.path + "." if b.path else "", b.index) for b in self.adapter.blocks]  # "": the whole model
        for path, module in self.adapter.denoiser.named_modules():
            block = next((i for prefix, i in owners if (path + ".").startswith(prefix)), None)
            level = spec.level(path, self.adapter.denoiser) if spec.level else 0
            if isinstance(module, torch.nn.Linear):
                self.terms.append(Term(path, block, "linear", 2.0 * module.in_features * module.out_features,
                                       spec.stream_of(path), level))
            elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                per_out = 2.0 * module.in_channels // module.groups * module.out_channels
                self.terms.append(Term(path, block, "conv", per_out * math.prod(module.kernel_size),
                                       spec.stream_of(path), level))
            elif _is_attention(module):
                q = tuple(spec.stream_of(f"{path}.{n}") for n in ("to_q", "add_q_proj") if _linear(module, n))
                kv = tuple(spec.stream_of(f"{path}.{n}") for n in ("to_k", "add_k_proj") if _linear(module, n))
                self.terms.append(Term(path, block, "attention", 4.0 * module.to_q.out_features,
                                       level=level, q_streams=q, kv_streams=kv))
            for op in spec.attention_ops:  # attention called as a function (fused qkv): named by the adapter
                if re.search(op.path, path):
                    width = functools.reduce(getattr, op.width.split("."), module)
                    self.terms.append(Term(path, block, "attention", 4.0 * width, level=level,
                                           q_streams=op.q_streams, kv_streams=op.kv_streams))

        # modules the denoiser runs a second time outside their block count again, outside blocks
        self.terms += [dataclasses.replace(t, block=None) for t in self.terms
                       if any(t.path.startswith(p) for p in spec.reruns)]

    def term_flops(self, term: Term, layout: TokenLayout, reduction: Reduction | None = None) -> float:
        """FLOPs of one term for one sample (with its submodule's token reduction, if any)."""
        q = k = None
        if reduction is not None:
            q, k = reduction.query, reduction.keys
        if term.kind == "attention":
            nq = sum(tokens(s, layout, term.level, q) for s in term.q_streams)
            nk = sum(tokens(s, layout, term.level, k) for s in term.kv_streams)
            return term.coef * nq * nk * (1.0 if reduction is None else reduction.density)
        image = k if term.path.endswith(KV_PROJECTIONS) else q
        return term.coef * tokens(term.stream, layout, term.level, image)

    def block_flops(self, layout: TokenLayout, reductions: dict[str, Reduction] | None = None) -> list[float]:
        """FLOPs of each adapter block for one sample; the last entry is everything outside blocks.

        `reductions` maps submodule paths to the tokens they ran on instead (token merging); every term under
        such a path is priced at those, and the reduction's `extra` is charged to the submodule's block.
        """
        out = [0.0] * (len(self.adapter.blocks) + 1)
        for term in self.terms:
            out[-1 if term.block is None else term.block] += self.term_flops(term, layout)
        for path, reduction in (reductions or {}).items():
            for term in self._under(path):
                col = -1 if term.block is None else term.block
                out[col] += self.term_flops(term, layout, reduction) - self.term_flops(term, layout)
            out[self.block_of(path)] += reduction.extra
        return out

    def block_of(self, path: str) -> int:
        """Column of `block_flops` that module `path` is charged to (-1: outside blocks)."""
        for block in self.adapter.blocks:
            if not block.path or path == block.path or path.startswith(block.path + "."):
                return block.index
        return -1

    def _under(self, path: str) -> list[Term]:
        """The terms of module `path` and its children (memoised: summaries ask per call)."""
        if path not in self._under_cache:
            self._under_cache[path] = [t for t in self.terms if t.path == path or t.path.startswith(path + ".")]
        return self._under_cache[path]

    def call_flops(self, layout: TokenLayout, batch: int = 1) -> float:
        """Dense FLOPs of one denoiser call on `batch` samples."""
        return batch * sum(self.block_flops(layout))


def _linear(module: torch.nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), torch.nn.Linear)


def _is_attention(module: torch.nn.Module) -> bool:
    return _linear(module, "to_q") and _linear(module, "to_k")


def _families() -> list[str]:
    from ..adapters.base import supported

    return list(supported())
