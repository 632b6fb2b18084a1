"""fastdiff.kernels — Triton kernels (reference + Triton + launcher per op). Only fastdiff.attention.dispatch
imports this package."""
