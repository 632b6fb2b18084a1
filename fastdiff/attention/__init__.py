"""Attention backends (dispatch) and the routing of a model's SDPA calls to them (route)."""

from .dispatch import BACKENDS, BlockSparse, attention, choose, predict

__all__ = ["BACKENDS", "BlockSparse", "attention", "choose", "predict"]
