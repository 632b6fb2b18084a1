"""What stands in for a skipped span: the last computed value, or a forecast from the last few.

An estimator keeps, per cached span, the values (lists of tensors: the span's residuals, or a UNet
block's outputs) of the last computed steps and returns their value at a later step. The variable is
the step index, so uneven gaps between computed steps (dynamic policies) are handled exactly.
All arithmetic is tensor arithmetic on the device: no host syncs.
"""

from __future__ import annotations

from typing import Sequence

import torch

Leaves = list  # list[torch.Tensor | None]


def _t(x) -> bool:
    return isinstance(x, torch.Tensor)


def _axpy(a: Leaves, b: Leaves, alpha: float) -> Leaves:
    """a + alpha * b, leaf-wise; non-tensor leaves (None, flags) are constants."""
    return [x + alpha * y if _t(x) else x for x, y in zip(a, b)]


def _diff(a: Leaves, b: Leaves, h: float) -> Leaves:
    """(a - b) / h, leaf-wise: a divided difference."""
    return [(x - y) / h if _t(x) else x for x, y in zip(a, b)]


class Estimator:
    """Keeps the last `keep` computed (step, leaves) and predicts the leaves at another step."""

    keep = 1

    def __init__(self, offload: bool = False):
        self.history: list[tuple[int, Leaves]] = []  # oldest first
        self.offload = offload
        self.device: torch.device | None = None

    def push(self, step: int, leaves: Leaves) -> None:
        if self.history and self.history[-1][0] == step:
            self.history.pop()  # a second-order sampler's second call of the same step replaces the first
        if self.offload:
            self.device = next(x.device for x in leaves if _t(x))
            leaves = [x.to("cpu", non_blocking=True) if _t(x) else x for x in leaves]
        self.history.append((step, leaves))
        del self.history[: -self.keep]

    @property
    def ready(self) -> bool:
        return bool(self.history)

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for _, leaves in self.history for x in leaves if _t(x))

    def predict(self, step: int) -> Leaves:
        points = self.history
        if self.offload:
            points = [(s, [x.to(self.device, non_blocking=True) if _t(x) else x for x in v]) for s, v in points]
        return self._predict(step, points)

    def _predict(self, step: int, points: Sequence[tuple[int, Leaves]]) -> Leaves:
        return points[-1][1]


class Reuse(Estimator):
    """The value of the last computed step, as it was (FORA, DeepCache, first-block cache)."""


class Taylor(Estimator):
    """Newton forward extrapolation through the last `order + 1` computed steps (TaylorSeer).

    Order 1: F_k + D1 (s - s_k); order 2 adds D2 (s - s_k)(s - s_{k-1}), with D1, D2 the divided
    differences. Exact for features that are polynomials of that order in the step index; with fewer
    computed steps than order + 1 the order is what the history supports (as TaylorSeer starts out).
    """

    def __init__(self, order: int = 1, offload: bool = False):
        super().__init__(offload)
        self.order = order
        self.keep = order + 1

    def _predict(self, step, points):
        (s0, f0) = points[-1]
        if len(points) < 2:
            return f0
        (s1, f1) = points[-2]
        d1 = _diff(f0, f1, s0 - s1)
        out = _axpy(f0, d1, step - s0)
        if self.order >= 2 and len(points) >= 3:
            (s2, f2) = points[-3]
            d1_prev = _diff(f1, f2, s1 - s2)
            d2 = _diff(d1, d1_prev, s0 - s2)
            out = _axpy(out, d2, (step - s0) * (step - s1))
        return out


class FoCa(Estimator):
    """Forecast, then calibrate: an Adams–Bashforth-2 predictor corrected by the trapezoid rule.

    With backward slopes d_k, d_{k-1} at the last two computed steps and h = s - s_k:
    predictor F_p = F_k + h (3 d_k - d_{k-1}) / 2, predicted slope d_p = (F_p - F_k) / h,
    corrector F = F_k + h (d_k + d_p) / 2 = F_k + h (5 d_k - d_{k-1}) / 4.
    The correction halves the second-order term of the plain extrapolation, which keeps long forecasts
    from overshooting where the feature trajectory bends; exact for features linear in the step index.
    """

    keep = 3

    def _predict(self, step, points):
        (s0, f0) = points[-1]
        if len(points) < 2:
            return f0
        (s1, f1) = points[-2]
        d0 = _diff(f0, f1, s0 - s1)
        h = step - s0
        if len(points) < 3:
            return _axpy(f0, d0, h)
        (s2, f2) = points[-3]
        d1 = _diff(f1, f2, s1 - s2)
        return [a + h * (5 * b - c) / 4 if _t(a) else a for a, b, c in zip(f0, d0, d1)]


def make(name: str, order: int, offload: bool) -> Estimator:
    if name == "reuse":
        return Reuse(offload)
    if name == "taylor":
        return Taylor(order, offload)
    if name == "foca":
        return FoCa(offload)
    raise ValueError(f"unknown estimator {name!r}")  # config validation keeps this unreachable
