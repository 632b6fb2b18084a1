"""Kernel benchmark: fastdiff's block-sparse FlashAttention vs SDPA (dense: flash and cuDNN backends) vs FlexAttention
with the same block mask, over sequence length, head dim and block sparsity.

    python -m fastdiff.eval.bench_kernels                  # GPU: N 4096/16384/65536, D 64/128, bf16, 0-95% sparsity
    python -m fastdiff.eval.bench_kernels --smoke          # CPU: tiny shapes under the Triton interpreter (proves it runs)
    python -m fastdiff.eval.bench_kernels --compile-only   # no GPU needed: compile every kernel config for sm_90, ptxas
                                                           # registers / spills / shared memory

Sparsity s: every (head, query block) attends a random set of exactly round((1 - s) * KB) key blocks (at least one),
seeded, the same mask for our kernel and Flex (its blocks given as "full" blocks: no mask_mod work). TFLOP/s count
4 * B * H * D FLOPs per attended (query, key) pair: "eff" counts the blocks computed, "dense-eq" the full N x N (what
the same time would mean for dense attention). The SDPA baseline is the faster of its flash and cuDNN backends. The
issue's goals, printed as checks: >= 7x dense SDPA at 90% sparsity for N >= 16k, >= 1.2x Flex with the same mask,
dense path >= 0.95x SDPA. Also times the block predictor (mean pooling, antidiagonal stride 16) at 10% density.

Writes <out>/results.json and README.md (table, device, versions, command); --out defaults to
eval/results/kernels-<device> (a temporary folder for --smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff.eval import timing
from fastdiff.kernels import runtime
from fastdiff.kernels.block_select import predict_blocks
from fastdiff.kernels.block_sparse_attention import block_sparse_attention, mask_to_index, num_blocks

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_SPARSE_X_SDPA, GOAL_X_FLEX, GOAL_DENSE_X_SDPA = 7.0, 1.2, 0.95


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536], help="sequence lengths (Nq = Nk)")
    p.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0, 50, 75, 90, 95], help="percent of blocks skipped")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.5, help="timed seconds per measurement (after warm-up), split "
                   "over --repeats interleaved rounds")
    p.add_argument("--repeats", type=int, default=timing.MIN_REPEATS, help="interleaved timed rounds per kernel")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, fixed tiny shapes (overrides --n/--d)")
    p.add_argument("--compile-only", action="store_true", help="compile the kernel configs for --arch, no GPU needed")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only (90 = H100)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:  # small enough for the interpreter (~1000x slower than SDPA)
        args.n, args.d, args.batch, args.heads = [128, 256], [64], 1, 2
        args.block_q = args.block_k = 32
        args.dtype, args.seconds = "float32", 0.0  # bf16 tl.dot is wrong in the interpreter (one call per round)
    return args


# -- inputs --------------------------------------------------------------------------------------------------------
def random_layout(h: int, qb: int, kb: int, sparsity: float, seed: int, device):
    """Block mask (1, H, QB, KB) with exactly round((1 - s) * KB) key blocks per query block (>= 1), as a layout."""
    keep = max(1, round((1.0 - sparsity) * kb))
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(1, h, qb, kb, generator=g).argsort(-1)
    mask = torch.zeros(1, h, qb, kb, dtype=torch.bool).scatter_(-1, order[..., :keep], True)
    index, count = mask_to_index(mask)
    return index.to(device), count.to(device)


def flex_block_mask(index, count, n: int, block_q: int, block_k: int):
    """Our layout as a Flex BlockMask: the same (count, index) format, given as 'full' blocks so the fused kernel
    skips mask_mod inside them. The mask_mod still spells out the block mask: eager Flex (CPU) ignores the block
    lists and applies mask_mod to the full score matrix."""
    from torch.nn.attention.flex_attention import BlockMask

    from fastdiff.kernels.block_sparse_attention import index_to_mask

    blocks = index_to_mask(index, count, index.shape[-1])

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[b, h, q_idx // block_q, kv_idx // block_k]

    return BlockMask.from_kv_blocks(
        torch.zeros_like(count), torch.zeros_like(index), count, index,
        BLOCK_SIZE=(block_q, block_k), mask_mod=mask_mod, seq_lengths=(n, n), compute_q_blocks=False,
    )


# -- timing --------------------------------------------------------------------------------------------------------
def kernel_arm(name: str, fn, seconds: float, session=contextlib.nullcontext):
    """(arm, iters): the arm runs `fn` `iters` times back to back per timed round, iters sized from one call so a
    round takes about `seconds` (1 to 100 calls); the timing helper warms it up and interleaves it with the other
    kernels of the shape. Raises what fn raises (an unavailable SDPA backend) before any timing."""
    with session():
        fn()
        timing.sync()
        start = time.perf_counter()
        fn()
        timing.sync()
        one = time.perf_counter() - start
    iters = max(1, min(100, int(seconds / max(one, 1e-6))))

    def call(_):
        for _ in range(iters):
            out = fn()
        return out

    return timing.Arm(name, call, session=session), iters


def per_call_ms(t: timing.Timing, iters: int) -> timing.Timing:
    """The rounds of a kernel arm as milliseconds per call."""
    return timing.Timing(t.name, [x * 1e3 / iters for x in t.times])


def sdpa_backends():
    """(name, context factory) for the dense baselines that exist here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        return [("sdpa", lambda: sdpa_kernel([SDPBackend.MATH]))]
    return [("sdpa-flash", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
            ("sdpa-cudnn", lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))]


def tflops(pairs: float, d: int, ms: float) -> float:
    return 4.0 * pairs * d / (ms * 1e-3) / 1e12 if ms else float("nan")


# -- the run -------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            sys.exit("no CUDA GPU: run with --smoke (CPU interpreter) or --compile-only")
        runtime.use_interpreter()
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    dtype = getattr(torch, args.dtype)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        # compiled on GPU (the fused Triton kernel); eager on CPU is a correctness path only
        flex = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
    rows, predictor = [], []
    for n in args.n:
        for d in args.d:
            shape_rows, shape_predictor = bench_shape(args, n, d, dtype, device, flex)
            rows += shape_rows
            predictor += shape_predictor
            if device == "cuda":
                torch.cuda.empty_cache()
    return dict(rows=rows, predictor=predictor, checks=checks(rows))


def bench_shape(args, n: int, d: int, dtype, device, flex) -> tuple[list, list]:
    """Every sparsity at one (N, D): SDPA, ours and Flex at each sparsity warmed up, then timed in interleaved rounds
    (fastdiff.eval.timing); rows of timings, and the predictor's timings."""
    b, h, bq, bk = args.batch, args.heads, args.block_q, args.block_k
    g = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    qb, kb = num_blocks(n, bq), num_blocks(n, bk)
    print(f"N={n} D={d} B={b} H={h} blocks {bq}x{bk} ({qb}x{kb}) {args.dtype}", flush=True)
    arms, iters, layouts = [], {}, {}

    def add(name, fn, session=contextlib.nullcontext):
        arm, iters[name] = kernel_arm(name, fn, args.seconds / args.repeats, session)
        arms.append(arm)

    for name, ctx in sdpa_backends():
        try:
            add(name, lambda: F.scaled_dot_product_attention(q, k, v), ctx)
        except RuntimeError as err:  # backend unavailable for this dtype/shape/GPU
            print(f"  {name}: unavailable ({str(err).splitlines()[0][:100]})")
    sdpa_names = [a.name for a in arms]
    for s in args.sparsity:
        index, count = layouts[s] = random_layout(h, qb, kb, s / 100.0, args.seed, device)
        add(f"ours {s}", lambda index=index, count=count: block_sparse_attention(q, k, v, index, count, bq, bk))
        if flex is not None:
            mask = flex_block_mask(index.expand(b, h, qb, kb).contiguous(), count.expand(b, h, qb).contiguous(),
                                   n, bq, bk)
            add(f"flex {s}", lambda mask=mask: flex(q, k, v, block_mask=mask))
    timed = {name: per_call_ms(t, iters[name]) for name, t in timing.interleaved(arms, args.repeats).items()}
    sdpa = {name: timed[name].median for name in sdpa_names}
    best = min(sdpa_names, key=lambda name: sdpa[name]) if sdpa else None
    rows, predictor = [], []
    for s in args.sparsity:
        index, count = layouts[s]
        pairs = float(count.sum()) * bq * bk * b  # every block is whole: N is a multiple of the blocks here
        dense_pairs = float(b * h * n * n)
        ours = timed[f"ours {s}"]
        row = dict(n=n, d=d, batch=b, heads=h, block_q=bq, block_k=bk, dtype=args.dtype, sparsity=s,
                   density=pairs / dense_pairs, ours_ms=ours.median, ours_spread=ours.spread, sdpa_ms=sdpa,
                   sdpa_best_ms=sdpa[best] if best else float("nan"),
                   ours_tflops_eff=tflops(pairs, d, ours.median), ours_tflops_dense_eq=tflops(dense_pairs, d, ours.median))
        if best:  # ours vs dense SDPA cannot honestly beat the pair count: the bound is 1 / density
            speed = timing.compare(timed[best], ours, bound=dense_pairs / pairs)
            row.update(x_sdpa=speed.ratio, x_sdpa_range=[speed.low, speed.high], reliable=speed.reliable,
                       timing_note=speed.note)
        else:
            row.update(x_sdpa=float("nan"), reliable=False, timing_note="no SDPA backend ran")
        if flex is not None:
            fl = timed[f"flex {s}"]
            vs_flex = timing.compare(fl, ours)
            row.update(flex_ms=fl.median, flex_tflops_eff=tflops(pairs, d, fl.median), x_flex=vs_flex.ratio)
            if not vs_flex.reliable:
                row["reliable"] = False
                row["timing_note"] = "; ".join(x for x in (row["timing_note"], "vs flex: " + vs_flex.note) if x)
            ref = flex(q, k, v, block_mask=flex_block_mask(index.expand(b, h, qb, kb).contiguous(),
                                                          count.expand(b, h, qb).contiguous(), n, bq, bk)).float()
            ours_out = block_sparse_attention(q, k, v, index, count, bq, bk).float()
            row["max_rel_err_vs_flex"] = float((ours_out - ref).abs().max() / ref.abs().max())
        rows.append(row)
        print("  " + describe(row), flush=True)
    top_k = max(1, round(0.1 * kb))
    pred_arms, pred_iters = [], {}
    for method, stride in (("mean", 8), ("antidiag", min(16, bq, bk))):
        arm, pred_iters[method] = kernel_arm(method, lambda method=method, stride=stride: predict_blocks(
            q, k, bq, bk, method=method, stride=stride, top_k=top_k), args.seconds / args.repeats)
        pred_arms.append(arm)
    for method, t in timing.interleaved(pred_arms, args.repeats).items():
        t = per_call_ms(t, pred_iters[method])
        stride = 8 if method == "mean" else min(16, bq, bk)
        predictor.append(dict(n=n, d=d, method=method, stride=stride, top_k=top_k, ms=t.median, spread=t.spread))
        print(f"  predictor {method} (stride {stride}, top_k {top_k}): {t.median:.3f} ms ±{t.spread:.0%}", flush=True)
    return rows, predictor


def describe(r: dict) -> str:
    text = (f"sparsity {r['sparsity']:>4.0f}%: ours {r['ours_ms']:.3f} ms ±{r['ours_spread']:.0%} "
            f"({r['ours_tflops_eff']:.1f} TFLOP/s eff, "
            f"{r['ours_tflops_dense_eq']:.1f} dense-eq) = {r['x_sdpa']:.2f}x SDPA")
    if "flex_ms" in r:
        text += f", flex {r['flex_ms']:.3f} ms = {r['x_flex']:.2f}x flex, err {r['max_rel_err_vs_flex']:.1e}"
    return text + ("" if r["reliable"] else f"  UNRELIABLE ({r['timing_note']})")


def checks(rows) -> list[dict]:
    """The issue's goals, each with the rows it covers and whether all of them pass."""
    out = []

    def check(name, goal, covered, value):
        values = [value(r) for r in covered]
        out.append(dict(check=name, goal=goal, cases=len(values), worst=min(values) if values else None,
                        passed=min(values) >= goal if values else None))

    check("sparse 90% vs dense SDPA, N >= 16k", GOAL_SPARSE_X_SDPA,
          [r for r in rows if r["sparsity"] == 90 and r["n"] >= 16384], lambda r: r["x_sdpa"])
    check("vs Flex, same mask (sparsity > 0)", GOAL_X_FLEX,
          [r for r in rows if r["sparsity"] > 0 and "x_flex" in r], lambda r: r["x_flex"])
    check("dense path vs SDPA", GOAL_DENSE_X_SDPA, [r for r in rows if r["sparsity"] == 0], lambda r: r["x_sdpa"])
    return out


# -- report --------------------------------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    out = dict(device=timing.device(), torch=torch.__version__, python=platform.python_version())
    try:
        out["triton"] = md.version("triton")
    except md.PackageNotFoundError:
        out["triton"] = "absent"
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def write(out_dir: Path, result: dict, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({**info, **result}, indent=1))
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    lines = ["# Block-sparse attention kernel benchmark", ""]
    lines += [f"- **{key}**: {value}" for key, value in info.items()]
    lines += ["", "ms are medians per call; TFLOP/s eff counts computed blocks, dense-eq the full N x N; x = baseline ms / "
              "ours ms; SDPA = the faster of its flash and cuDNN backends. " + timing.TABLE_NOTE + " Here the FLOPs "
              "bound of ours vs SDPA is 1 / density.", "",
              "| N | D | sparsity % | ours ms ± spread | TFLOP/s eff | TFLOP/s dense-eq | SDPA ms | x SDPA | Flex ms | "
              "x Flex | err vs Flex | timing |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        err = r.get("max_rel_err_vs_flex", float("nan"))
        verdict = "ok" if r["reliable"] else f"**unreliable** ({r['timing_note']})"
        lines.append(f"| {r['n']} | {r['d']} | {r['sparsity']:.0f} | {fmt(r['ours_ms'])} ±{r['ours_spread']:.0%} | "
                     f"{r['ours_tflops_eff']:.1f} | {r['ours_tflops_dense_eq']:.1f} | {fmt(r['sdpa_best_ms'])} | "
                     f"{r['x_sdpa']:.2f} | {fmt(r.get('flex_ms'))} | {fmt(r.get('x_flex'))} | {err:.1e} | {verdict} |")
    lines += ["", "| check | goal | cases | worst | pass |", "|---|---|---|---|---|"]
    for c in result["checks"]:
        verdict = {True: "yes", False: "NO", None: "n/a"}[c["passed"]]
        lines.append(f"| {c['check']} | >= {c['goal']}x | {c['cases']} | {fmt(c['worst'])} | {verdict} |")
    lines += ["", "| N | D | predictor | stride | top_k | ms |", "|---|---|---|---|---|---|"]
    for p in result["predictor"]:
        lines.append(f"| {p['n']} | {p['d']} | {p['method']} | {p['stride']} | {p['top_k']} | {p['ms']:.3f} |")
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# -- compile-only: registers and spills without a GPU ---------------------------------------------------------------
def compile_only(args) -> None:
    """Compile each config the launchers would use for sm_<arch> (triton's bundled ptxas) and print registers,
    spills and shared memory: a CPU-side check that the kernels build for the GPU and keep their tiles in registers.
    Uses triton's ASTSource (internal API, triton 3.x)."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdiff.kernels.block_select import kernel as sel
    from fastdiff.kernels.block_select.launcher import antidiag_config, mean_config
    from fastdiff.kernels.block_sparse_attention import kernel as attn
    from fastdiff.kernels.block_sparse_attention.launcher import _launch_configs

    ptxas = Path(triton.__path__[0]) / "backends" / "nvidia" / "bin" / "ptxas"
    target = GPUTarget("cuda", args.arch, 32)
    tl_dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype]

    def build(fn, pointers, consts, num_warps, num_stages):
        consts = {**consts, **{a: 1 for a in fn.arg_names if a.startswith("stride") and a.endswith("d")}}
        signature, attrs = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in consts:
                signature[a] = "constexpr"
                continue
            signature[a] = pointers.get(a, "fp32" if a == "qk_scale" else "i32")
            if a in pointers or re.fullmatch(r"stride_[qkvo][bhn]", a):  # what the JIT infers for aligned tensors
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()},
                        attrs=attrs)
        compiled = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(compiled.asm["ptx"])
            f.flush()
            report = subprocess.run([str(ptxas), f"-arch=sm_{args.arch}a" if args.arch >= 90 else f"-arch=sm_{args.arch}",
                                     "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", report)
        spills = re.search(r"(\d+) bytes spill stores", report)
        return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None,
                compiled.metadata.shared)

    qkv = {a: f"*{tl_dtype}" for a in ("Q", "K", "V", "OUT")} | {"KV_INDEX": "*i32", "KV_COUNT": "*i32"}
    for d in args.d:
        block_d = max(16, runtime.next_pow2(d))
        warps, stages = _launch_configs(args.block_q, args.block_k, block_d, getattr(torch, args.dtype))[0]
        consts = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=args.block_q, BLOCK_N=args.block_k, EVEN_M=True,
                      EVEN_N=True, EVEN_D=d == block_d, DOT_PRECISION="tf32x3" if tl_dtype == "fp32" else "tf32")
        for even in (True, False):
            regs, spill, smem = build(attn._block_sparse_attn_fwd, qkv, {**consts, "EVEN_M": even, "EVEN_N": even},
                                      warps, stages)
            print(f"attention D={d} {args.block_q}x{args.block_k} even={even} warps={warps} stages={stages}: "
                  f"{regs} registers, {spill} bytes spilled, {smem} bytes shared")
        qk = {"Q": f"*{tl_dtype}", "K": f"*{tl_dtype}", "OUT": "*fp32"}
        qb, kb = runtime.cdiv(max(args.n), args.block_q), runtime.cdiv(max(args.n), args.block_k)
        config = mean_config(qb, block_d)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        regs, spill, smem = build(sel._mean_scores_kernel, qk, dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_Q=args.block_q,
                                  BLOCK_K=args.block_k, **config), warps, stages)
        print(f"predictor mean D={d}: {regs} registers, {spill} bytes spilled, {smem} bytes shared")
        stride = min(16, args.block_q, args.block_k)
        rows_q, rows_k = args.block_q // stride, args.block_k // stride
        config = antidiag_config(rows_q, rows_k, qb * rows_q, kb * rows_k, block_d)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        regs, spill, smem = build(sel._antidiag_scores_kernel, qk, dict(
            HEAD_DIM=d, BLOCK_D=block_d, STRIDE=stride, ROWS_Q=rows_q, ROWS_K=rows_k,
            DOT_PRECISION="tf32x3" if tl_dtype == "fp32" else "tf32", **config), warps, stages)
        print(f"predictor antidiag D={d} stride {stride}: {regs} registers, {spill} bytes spilled, {smem} bytes shared")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.compile_only:
        compile_only(args)
        return
    info = versions()
    info["command"] = "python -m fastdiff.eval.bench_kernels " + shlex.join(sys.argv[1:] if argv is None else argv)
    info["shapes"] = f"B={args.batch} H={args.heads} blocks {args.block_q}x{args.block_k} {args.dtype}, seed {args.seed}"
    if args.smoke:
        info["note"] = "smoke run: CPU, Triton interpreter, tiny shapes — timings are meaningless"
    result = run(args)
    for c in result["checks"]:
        worst = "-" if c["worst"] is None else f"{c['worst']:.2f}x"
        verdict = {True: "PASS", False: "FAIL", None: "n/a (no such case in this run)"}[c["passed"]]
        print(f"CHECK {c['check']}: goal >= {c['goal']}x, worst {worst} over {c['cases']} cases -> {verdict}")
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="bench-kernels-")) if args.smoke else RESULTS / f"kernels-{slug(info['device'])}"
    write(out, result, info)
    print(f"wrote {out}/results.json and {out}/README.md")


if __name__ == "__main__":
    main()
