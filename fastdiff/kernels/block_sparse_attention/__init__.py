"""Block-sparse FlashAttention forward: reference (pure torch), Triton kernel, launcher, and layout helpers."""

from .launcher import block_sparse_attention
from .layout import dense_index, index_to_mask, mask_to_index, num_blocks, token_mask
from .reference import block_sparse_attention_reference

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "dense_index",
    "index_to_mask",
    "mask_to_index",
    "num_blocks",
    "token_mask",
]
