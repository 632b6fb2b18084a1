"""Analytic cost of a denoiser: FLOPs of every matmul/conv as a function of the token layout.

Walking the denoiser once, each nn.Linear / nn.ConvNd becomes a term "coef × tokens of its stream"
(the family adapter says which tokens a layer sees: image, text, both, or once per sample), and each
attention module (anything with `to_q`/`to_k` linears) a term "4 × Nq × Nk × inner width". Elementwise
ops and norms are left out, as torch's FlopCounterMode leaves them out. Evaluation is pure arithmetic,
so the planner can price any resolution, text length or token/sparsity reduction without running.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..adapters.base import GLOBAL, IMAGE, JOINT, TEXT, BlockAdapter
from ..context import TokenLayout
from ..errors import UnsupportedModelError


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


def tokens(stream: str, layout: TokenLayout, level: int = 0) -> int:
    """Number of rows a layer on `stream` processes per sample."""
    if stream == GLOBAL:
        return 1
    if stream == TEXT:
        return layout.text_tokens
    f, h, w = layout.grid
    for _ in range(level):  # stride-2 convs with padding 1 round up
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    image = f * h * w
    return image + layout.text_tokens if stream == JOINT else image


@dataclass
class CostModel:
    """FLOPs of one denoiser call per block, from the adapter's data; no forward is run."""

    adapter: BlockAdapter
    terms: list[Term] = field(default_factory=list)

    def __post_init__(self):
        spec = self.adapter.spec
        if spec.layout is None:
            raise UnsupportedModelError(
                f"{type(self.adapter.denoiser).__name__}: the cost model needs the token layout, which the auto "
                f"fallback adapter does not know; supported families: {sorted(_families())}"
            )
        owners = [(b.path + ".", b.index) for b in self.adapter.blocks]
        for path, module in self.adapter.denoiser.named_modules():
            block = next((i for prefix, i in owners if path.startswith(prefix)), None)
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

        # modules the denoiser runs a second time outside their block count again, outside blocks
        self.terms += [dataclasses.replace(t, block=None) for t in self.terms
                       if any(t.path.startswith(p) for p in spec.reruns)]

    def term_flops(self, term: Term, layout: TokenLayout) -> float:
        """FLOPs of one term for one sample."""
        if term.kind == "attention":
            nq = sum(tokens(s, layout, term.level) for s in term.q_streams)
            nk = sum(tokens(s, layout, term.level) for s in term.kv_streams)
            return term.coef * nq * nk
        return term.coef * tokens(term.stream, layout, term.level)

    def block_flops(self, layout: TokenLayout) -> list[float]:
        """FLOPs of each adapter block for one sample; the last entry is everything outside blocks."""
        out = [0.0] * (len(self.adapter.blocks) + 1)
        for term in self.terms:
            out[-1 if term.block is None else term.block] += self.term_flops(term, layout)
        return out

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
