"""fastdiff.kernels — Triton kernels, each op a pure-torch reference + a Triton kernel + a launcher:

- block_sparse_attention: block-sparse FlashAttention forward (the dense path is the same kernel on all blocks);
- block_select: block-importance scores (mean pooling, XAttention antidiagonals) and top-k/top-p block selection.

Only fastdiff.attention.dispatch imports this package. Importing it never imports triton: each launcher imports its
kernel module on first call, so TRITON_INTERPRET=1 (CPU, tests) only has to be set before that first call and kept
set while kernels run."""
