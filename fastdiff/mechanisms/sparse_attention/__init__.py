"""Block-sparse self-attention on the token grid (window, criss-cross, predicted top-k / top-p)."""

from .sparse import SparseAttention

__all__ = ["SparseAttention"]
