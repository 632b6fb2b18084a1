"""Block-importance predictor: fused Triton scores vs the pure-torch reference (mean pooling and XAttention
antidiagonals, odd shapes, fp32/fp16), the selection rules (top_k count exact, top_p mass and minimality, kept blocks
always present, indices ascending and in range) against a loop-by-loop reference, and input validation."""

import pytest
import torch

from fastdiff.kernels.block_select import (
    block_scores,
    block_scores_reference,
    predict_blocks,
    predict_blocks_reference,
    select_blocks,
    select_blocks_reference,
)
from fastdiff.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    index_to_mask,
    num_blocks,
)

from .common import DEVICE, needs_cuda, needs_triton, randn, rel_err

SHAPES = [  # nq, nk, d, block_q, block_k, stride, dtype
    (63, 63, 64, 16, 16, 4, torch.float32),
    (200, 257, 40, 32, 16, 8, torch.float16),
    (257, 200, 128, 64, 32, 16, torch.float32),
    (100, 300, 64, 16, 32, 16, torch.float16),
]


def _qk(nq, nk, d, dtype, seed=0):
    # a shared component makes scores peaked (as in real attention), so selections are not near-ties
    q = randn(2, 2, nq, d, seed=seed) + 0.5 * randn(1, 1, 1, d, seed=seed + 9)
    k = randn(2, 2, nk, d, seed=seed + 1) * torch.linspace(0.2, 2.0, nk, device=DEVICE)[:, None]
    return q.to(dtype), k.to(dtype)


@needs_triton
@pytest.mark.parametrize("method", ["mean", "antidiag"])
@pytest.mark.parametrize("nq,nk,d,block_q,block_k,stride,dtype", SHAPES,
                         ids=[f"{s[0]}x{s[1]}-d{s[2]}-b{s[3]}x{s[4]}-s{s[5]}-{str(s[6])[6:]}" for s in SHAPES])
def test_scores_match_reference(nq, nk, d, block_q, block_k, stride, dtype, method):
    q, k = _qk(nq, nk, d, dtype)
    out = block_scores(q, k, block_q, block_k, method, stride)
    ref = block_scores_reference(q, k, block_q, block_k, method, stride)
    assert out.shape == (2, 2, num_blocks(nq, block_q), num_blocks(nk, block_k)) and out.dtype == torch.float32
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert torch.allclose(out.sum(-1), torch.ones_like(out[..., 0]), atol=1e-5)


def test_antidiagonal_scores_by_hand():
    # one query block, two key blocks, stride 2: the antidiagonal of each 2x2 cell pairs q1.k0 + q0.k1
    q = torch.zeros(1, 1, 16, 1)
    k = torch.zeros(1, 1, 32, 1)
    q[..., 1, 0] = 1.0
    k[..., 16, 0] = 4.0  # key block 1, row 0 of a cell: meets q row 1
    s = block_scores_reference(q, k, 16, 16, "antidiag", stride=2, scale=1.0)
    # sub-row 0 sees logit 4/2 at sub-col 8 and 0 at the 15 others (key block 1 = sub-cols 8..15);
    # sub-rows 1..7 are uniform over the 16 sub-cols; the block averages its 8 sub-rows
    e2 = torch.tensor(2.0).exp()
    expected_kb1 = ((e2 + 7) / (e2 + 15) + 7 * 0.5) / 8
    assert torch.allclose(s[0, 0, 0], torch.stack([1 - expected_kb1, expected_kb1]))


@needs_triton
@pytest.mark.parametrize("method", ["mean", "antidiag"])
@pytest.mark.parametrize("rule", [dict(top_k=3), dict(top_p=0.6), dict(top_k=2, keep="diag"), dict(top_p=0.8, keep="diag")])
def test_predict_matches_reference_and_feeds_the_kernel(method, rule):
    nq, nk, block = 150, 130, 16
    q, k = _qk(nq, nk, 64, torch.float32, seed=3)
    qb, kb = num_blocks(nq, block), num_blocks(nk, block)
    if rule.get("keep") == "diag":
        rule = {**rule, "keep": torch.eye(qb, kb, dtype=torch.bool, device=DEVICE)[None, None]}
    index, count, density = predict_blocks(q, k, block, block, method=method, stride=8, **rule)
    rindex, rcount, rdensity = predict_blocks_reference(q, k, block, block, method=method, stride=8, **rule)
    assert torch.equal(count, rcount) and torch.equal(index, rindex) and torch.allclose(density, rdensity)
    v = randn(2, 2, nk, 64, seed=11)
    out = block_sparse_attention(q, k, v, index, count, block, block)
    assert rel_err(out, block_sparse_attention_reference(q, k, v, index, count, block, block)) < 1e-5


def _random_scores(shape, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2).softmax(-1)


RULES = [dict(top_k=3), dict(top_k=20), dict(top_p=0.5), dict(top_p=0.9), dict(top_p=1.0), dict(top_k=2, keep=True),
         dict(top_p=0.7, keep=True), dict(top_k=1, keep=True)]


@pytest.mark.parametrize("rule", RULES, ids=[str(r) for r in RULES])
def test_selection_rules(rule):
    b, h, qb, kb = 2, 3, 6, 9
    scores = _random_scores((b, h, qb, kb))
    if rule.get("keep"):
        keep = torch.rand(1, h, qb, kb, generator=torch.Generator().manual_seed(1)) < 0.25
        keep[0, 0, 0] = True  # a row where keep alone passes every rule
        rule = {**rule, "keep": keep}
    keep = rule.get("keep")
    index, count, density = select_blocks(scores, **rule)
    rindex, rcount, rdensity = select_blocks_reference(scores, **rule)
    assert torch.equal(count, rcount) and torch.equal(index, rindex[..., : index.shape[-1]])
    assert torch.allclose(density, rdensity) and torch.allclose(density, count.sum(-1).float() / (qb * kb))
    assert index.dtype == count.dtype == torch.int32
    assert int(index.min()) >= 0 and int(index.max()) < kb
    k = index.shape[-1]
    valid = torch.arange(k) < count.unsqueeze(-1)
    assert bool((index.diff(dim=-1)[valid[..., 1:]] > 0).all())
    mask = index_to_mask(index, count, kb)
    kept = torch.zeros_like(mask) if keep is None else keep.expand_as(mask)
    assert bool((mask | ~kept).all())  # kept blocks always selected
    n_keep = kept.sum(-1)
    if "top_k" in rule:
        assert torch.equal(count.long(), n_keep.clamp(min=rule["top_k"]).clamp(max=kb))
        if keep is None:
            assert k == min(rule["top_k"], kb)
    else:
        mass = (scores * mask).sum(-1)
        assert bool((mass >= rule["top_p"] - 1e-5).all())
        # minimal: dropping the weakest non-kept selected block falls below top_p
        extra = mask & ~kept
        weakest = torch.where(extra, scores, 2.0).min(-1).values
        has_extra = extra.any(-1)
        assert bool((mass - weakest < rule["top_p"])[has_extra].all())


BAD = [
    (dict(method="max"), "method"),
    (dict(method="antidiag", stride=3), "stride"),
    (dict(method="antidiag", stride=32), "stride"),
    (dict(top_k=None), "exactly one"),
    (dict(top_p=0.5), "exactly one"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=None, top_p=1.5), "top_p"),
    (dict(keep=torch.ones(1, 1, 3, 3)), "keep"),
    (dict(keep=torch.ones(1, 1, 2, 3, dtype=torch.bool)), "keep"),
    (dict(block_q=48), "block_q"),
    (dict(k=torch.randn(1, 2, 40, 32)), "matching q"),
    (dict(q=torch.randn(1, 2, 40, 64).half()), "dtype"),
]


@pytest.mark.parametrize("bad,match", BAD, ids=[m + str(i) for i, (_, m) in enumerate(BAD)])
@pytest.mark.parametrize("fn", [predict_blocks, predict_blocks_reference], ids=["triton", "reference"])
def test_invalid_inputs_raise(fn, bad, match):
    args = dict(q=torch.randn(1, 2, 40, 64), k=torch.randn(1, 2, 40, 64), block_q=16, block_k=16, top_k=2)
    with pytest.raises(ValueError, match=match):
        fn(**{**args, **bad})


@needs_cuda
@pytest.mark.parametrize("method", ["mean", "antidiag"])
def test_gpu_real_shapes_bf16(method):
    q, k = _qk(4096 + 33, 4096 + 33, 128, torch.bfloat16)
    out = block_scores(q, k, 64, 64, method, 16)
    ref = block_scores_reference(q, k, 64, 64, method, 16)
    assert rel_err(out, ref) < 2e-2
