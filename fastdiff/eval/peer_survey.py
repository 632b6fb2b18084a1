"""Which peer runs on which tiny family, and how much each level really skips (the numbers in eval/PEERS.md).

    python -m fastdiff.eval.peer_survey --steps 10 [--families flux,wan] [--peers diffusers-fbc]

For every family and peer: build the tiny seeded pipeline, run it once plain, then per level apply -> run -> remove
-> run.  What was skipped is counted below the peer: every repeated transformer block and every attention module
gets an instance-level counting ``forward`` *before* the peer is applied, so the peer's hooks wrap the counter and
only real executions are counted.  FLOPs from ``torch.utils.flop_counter``: the call's saving over the plain run,
as a fraction of the plain run's denoiser FLOPs.  Reported: the
fraction of block executions skipped, of attention executions skipped, of denoiser FLOPs saved, the PSNR of the
output against the plain run, and whether the remover gave back the plain output bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import peer_backends as B
from . import peers as P


def _run(pipe, kwargs, den, name=None, level=None, target=None) -> tuple[torch.Tensor, dict]:
    """One seeded call, the peer (if any) applied on top of the counters; executions and denoiser FLOPs."""
    from . import tiny

    with P.counting(den) as counts:
        remove = P.apply_peer(pipe, name, level, call_kwargs=kwargs, target_skip=target) if name else None
        counts.update(calls=0, blocks=0, attn=0)  # calibration / search runs inside apply_peer are not this run
        try:
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                out = tiny.output_tensor(pipe(**B.cloned(kwargs)))
        finally:
            if remove is not None:
                remove()
    flops = fc.get_flop_counts()
    # the whole call's FLOPs (peers that wrap the denoiser's forward confuse the per-module attribution); the
    # denoiser's own share only from the plain run, to turn the difference into a fraction
    counts["flops"] = sum(flops.get("Global", {}).values())
    counts["den_flops"] = sum(flops.get(type(den).__name__, {}).values())
    counts["kwargs"] = remove.kwargs if remove is not None else None
    return out, counts


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x.double() - ref.double()).pow(2).mean().item()
    span = (ref.max() - ref.min()).item() or 1.0
    return math.inf if mse == 0 else 10 * math.log10(span**2 / mse)


def survey(families, peer_names, steps: int, cfg: bool = True, match: bool = False) -> list[dict]:
    """Rows of (family, peer, level): what it skipped, its PSNR against the plain run, whether removing it restored
    the plain output bit for bit -- or why it does not run.  ``match``: threshold peers at ``LEVEL_TARGETS``."""
    from . import tiny

    rows = []
    for family in families:
        pipe = tiny.build_pipeline(family, seed=0)
        kwargs = tiny.pipeline_kwargs(family, cfg=cfg, steps=steps)
        den = B.denoiser(pipe)
        ref, base = _run(pipe, kwargs, den)
        for name in peer_names:
            peer = P.PEERS[name]
            ok = peer.supports(pipe)
            if not ok:
                rows.append(dict(family=family, peer=name, reason=str(ok)))
                continue
            if match and peer.threshold is None:
                continue
            for level in P.LEVELS:
                row = dict(family=family, peer=name, level=level)
                try:
                    out, c = _run(pipe, kwargs, den, name, level, P.LEVEL_TARGETS[level] if match else None)
                    again, _ = _run(pipe, kwargs, den)
                except Exception as e:  # recorded, not hidden: the support matrix is about what really runs
                    row["reason"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    rows.append(row)
                    continue
                row.update(
                    skipped_blocks=1 - c["blocks"] / base["blocks"] if base["blocks"] else None,
                    skipped_attn=1 - c["attn"] / base["attn"] if base["attn"] else None,
                    saved_flops=(base["flops"] - c["flops"]) / base["den_flops"] if base["den_flops"] else None,
                    psnr=_psnr(out, ref),
                    restored=bool(torch.equal(again, ref)),
                )
                if match:
                    row["threshold"] = c["kwargs"][peer.threshold]
                rows.append(row)
    return rows


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.2f}"
    return str(v)


def main(argv=None) -> None:
    from . import tiny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--families", default=",".join(tiny.FAMILIES))
    ap.add_argument("--peers", default=",".join(P.available()))
    ap.add_argument("--no-cfg", action="store_true")
    ap.add_argument("--match", action="store_true", help="threshold peers searched to LEVEL_TARGETS instead")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = survey(a.families.split(","), a.peers.split(","), a.steps, cfg=not a.no_cfg, match=a.match)
    cols = ["family", "peer", "level", "skipped_blocks", "skipped_attn", "saved_flops", "psnr", "restored", "reason"]
    cols[3:3] = ["threshold"] if a.match else []
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
