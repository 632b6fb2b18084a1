"""Block-importance predictor: pooled q/k scores (mean pooling or XAttention antidiagonals) fused in Triton, then
top-k / top-p block selection in torch, giving the layout block_sparse_attention consumes."""

from .launcher import block_scores, predict_blocks, predict_blocks_reference
from .reference import block_scores_reference, select_blocks_reference
from .select import select_blocks

__all__ = [
    "block_scores",
    "block_scores_reference",
    "predict_blocks",
    "predict_blocks_reference",
    "select_blocks",
    "select_blocks_reference",
]
