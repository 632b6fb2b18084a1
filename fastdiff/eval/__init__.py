"""Evaluation: reference models trained by this project, peers, benchmarks (installed as fastdiff.eval)."""
