"""Golden outputs for refactors: the output of every preset on every model of `test_presets_run`, hashed.

    python -m tests.golden record /tmp/golden.json   # before the first change
    python -m tests.golden check /tmp/golden.json    # after each one: every pair bit-identical, or a list of those not

Not a CI test: bit-identity holds on one machine and one torch build, not across CPUs. Each entry is the sha256 of
the output tensor's bytes plus the summary's predicted FLOPs and per-step decisions, so a refactor that changes
what a mechanism decides shows up even where the output happens to match.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

import fastdiff
from fastdiff.eval import reference

from .test_presets_run import MODELS, PRESETS, REFUSED, STEPS, _run

_PIPES: dict = {}


def _pipe(name):
    from fastdiff.eval import tiny

    if name not in _PIPES:
        pipe = reference.load(name) if name in reference.names() else tiny.build_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[name] = pipe
    return _PIPES[name]


def outputs(models=None) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name in models or MODELS:
        try:
            pipe = _pipe(name)
        except FileNotFoundError:  # a reference model whose weights are not trained yet
            continue
        for preset in PRESETS:
            if (name, preset) in REFUSED:
                continue
            h = fastdiff.apply(pipe, preset=preset)
            try:
                y = _run(pipe, name, STEPS[preset])
                s = h.summary()
            finally:
                h.remove()
            out[f"{name}/{preset}"] = dict(
                sha=hashlib.sha256(y.detach().contiguous().numpy().tobytes()).hexdigest(), flops=s.flops,
                decisions=[list(r.decisions) for r in s.per_step])
        _PIPES.pop(name)
    return out


def main(argv):
    mode, path = argv
    now = outputs()
    if mode == "record":
        json.dump(now, open(path, "w"), indent=1)
        print(f"recorded {len(now)} pairs -> {path}")
        return 0
    before = json.load(open(path))
    bad = [k for k in before if k in now and now[k] != before[k]]
    missing = sorted(set(before) - set(now))
    print(f"{len(before) - len(bad) - len(missing)}/{len(before)} pairs bit-identical" +
          (f"; changed: {bad}" if bad else "") + (f"; not run: {missing}" if missing else ""))
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
