"""Shared measurement helpers of the benchmarks and the CLI: device sync, timed sampling runs, spread, device name,
and the reference classifier's class accuracy."""

from __future__ import annotations

import platform
import time

import torch

from . import workloads


def sync() -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def spread(times) -> float:
    """Half the range of repeated timings, reported beside their median."""
    return (max(times) - min(times)) / 2


def device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def timed(wl: workloads.Workload, repeats: int):
    """(images of the last run on CPU, wall seconds of each of `repeats` runs of the workload's call)."""
    times, out = [], None
    for _ in range(repeats):
        kw = wl.make_kwargs()
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = wl.pipe(**kw)
        sync()
        times.append(time.perf_counter() - start)
    return wl.to_images(out).float().cpu(), times


def class_accuracy(model: str):
    """images -> fraction classified as asked (sample i is class i % 10) for a trained reference model, else None."""
    reference = workloads._reference()
    if reference is None or model not in reference.names():
        return None
    clf = reference.load_classifier(model)

    def accuracy(images):
        labels = torch.tensor([i % 10 for i in range(len(images))])
        with torch.no_grad():
            return float(clf.accuracy(images, labels))

    return accuracy
