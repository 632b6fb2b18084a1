"""Block-sparse FlashAttention: Triton kernel vs the pure-torch reference over odd shapes (N not a multiple of the
block, Nq != Nk, an odd head dim), every kind of layout (all blocks, one block, ~50% random, a query block with no
key block), shared and per-(batch, head) patterns; the dense path vs SDPA; strides, padding, input validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastdiff.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_index,
    index_to_mask,
    mask_to_index,
    num_blocks,
    token_mask,
)

from .common import CUDA, DEVICE, needs_cuda, needs_triton, randn, rel_err

B, H = 2, 2
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _qkv(nq, nk, d, dtype, seed=0, b=B, h=H):
    return randn(b, h, nq, d, dtype=dtype, seed=seed), randn(b, h, nk, d, dtype=dtype, seed=seed + 1), \
        randn(b, h, nk, d, dtype=dtype, seed=seed + 2)


def _layout(kind: str, shape, qb: int, kb: int, seed: int = 0):
    """A block mask of the given kind for layout dims `shape` = (Bi, Hi) -> (kv_index, kv_count) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    if kind == "all":
        mask = torch.ones(*shape, qb, kb, dtype=torch.bool)
    elif kind == "one":
        mask = torch.zeros(*shape, qb, kb, dtype=torch.bool)
        mask.scatter_(-1, torch.randint(kb, (*shape, qb, 1), generator=g), True)
    elif kind in ("random", "empty_row"):
        mask = torch.rand(*shape, qb, kb, generator=g) < 0.5
        mask[..., 0] |= ~mask.any(-1)  # random rows are never empty by chance
        if kind == "empty_row":
            mask[..., qb // 2, :] = False
    else:
        raise AssertionError(kind)
    return mask_to_index(mask.to(DEVICE))


SHAPES = [  # nq, nk, d, block_q, block_k, dtype
    (63, 63, 64, 16, 16, torch.float32),
    (200, 200, 128, 32, 32, torch.float16),
    (257, 257, 64, 32, 16, torch.float16),
    (200, 257, 40, 16, 32, torch.float32),
    (257, 63, 128, 64, 64, torch.float32),
]
PATTERNS = [("all", (1, 1)), ("one", (B, H)), ("random", (1, H)), ("random", (B, H)), ("empty_row", (B, 1))]


@needs_triton
@pytest.mark.parametrize("kind,layout_dims", PATTERNS, ids=[f"{k}-{bi}x{hi}" for k, (bi, hi) in PATTERNS])
@pytest.mark.parametrize("nq,nk,d,block_q,block_k,dtype", SHAPES,
                         ids=[f"{s[0]}x{s[1]}-d{s[2]}-b{s[3]}x{s[4]}-{str(s[5])[6:]}" for s in SHAPES])
def test_kernel_matches_reference(nq, nk, d, block_q, block_k, dtype, kind, layout_dims):
    q, k, v = _qkv(nq, nk, d, dtype)
    index, count = _layout(kind, layout_dims, num_blocks(nq, block_q), num_blocks(nk, block_k))
    out = block_sparse_attention(q, k, v, index, count, block_q, block_k)
    ref = block_sparse_attention_reference(q, k, v, index, count, block_q, block_k)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype]
    if kind == "empty_row":  # a query block with no key block gives exact zeros
        rows = slice(num_blocks(nq, block_q) // 2 * block_q, (num_blocks(nq, block_q) // 2 + 1) * block_q)
        assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))


@needs_triton
def test_shared_pattern_equals_the_same_pattern_per_batch_and_head():
    q, k, v = _qkv(100, 100, 64, torch.float32)
    index, count = _layout("random", (1, 1), 7, 7, seed=3)
    shared = block_sparse_attention(q, k, v, index, count, 16, 16)
    copied = block_sparse_attention(q, k, v, index.expand(B, H, -1, -1).contiguous(), count.expand(B, H, -1).contiguous(),
                                    16, 16)
    assert torch.equal(shared, copied)


@needs_triton
@pytest.mark.parametrize("nq,nk,d,block,dtype", [(63, 63, 64, 16, torch.float32), (200, 130, 128, 32, torch.float16),
                                                 (100, 100, 40, 32, torch.float32)])
def test_dense_path_matches_sdpa(nq, nk, d, block, dtype):
    q, k, v = _qkv(nq, nk, d, dtype, seed=5)
    index, count = dense_index(num_blocks(nq, block), num_blocks(nk, block), device=DEVICE)
    out = block_sparse_attention(q, k, v, index, count, block, block)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(out, ref) < TOL[dtype]


@needs_triton
def test_custom_scale_and_padding_entries_are_ignored():
    q, k, v = _qkv(70, 90, 64, torch.float32, seed=7)
    index, count = _layout("random", (B, H), 5, 6, seed=1)
    ref = block_sparse_attention_reference(q, k, v, index, count, 16, 16, scale=0.3)
    out = block_sparse_attention(q, k, v, index, count, 16, 16, scale=0.3)
    assert rel_err(out, ref) < 1e-5
    # entries past kv_count are never read: any in-range padding gives the same bits
    valid = torch.arange(index.shape[-1], device=DEVICE) < count.unsqueeze(-1)
    repadded = torch.where(valid, index, 0).to(torch.int32)
    assert torch.equal(block_sparse_attention(q, k, v, repadded, count, 16, 16, scale=0.3), out)


@needs_triton
def test_strided_inputs_and_output_layout():
    # diffusers hands (B, N, H, D) projections around: seen as (B, H, N, D) they are strided, not copied
    b, n, h, d = 2, 80, 3, 64
    q, k, v = (randn(b, n, h, d, seed=s).transpose(1, 2) for s in range(3))
    index, count = dense_index(num_blocks(n, 32), num_blocks(n, 32), device=DEVICE)
    out = block_sparse_attention(q, k, v, index, count, 32, 32)
    assert out.stride() == q.stride()  # written in q's layout: transposing back is free
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5
    # a strided head dim is made contiguous first (still correct)
    qs = randn(b, h, n, 2 * d, seed=9)[..., ::2]
    assert rel_err(block_sparse_attention(qs, k, v, index, count, 32, 32), F.scaled_dot_product_attention(qs, k, v)) < 1e-5


def test_layout_helpers_round_trip():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    mask[0, 0, 1] = False
    index, count = mask_to_index(mask)
    assert index.dtype == count.dtype == torch.int32 and index.shape == (2, 3, 5, 7)
    assert torch.equal(index_to_mask(index, count, 7), mask)
    assert torch.equal(count, mask.sum(-1).int())
    assert int(index.min()) >= 0 and int(index.max()) < 7
    valid = torch.arange(7) < count.unsqueeze(-1)
    assert bool((index.diff(dim=-1)[valid[..., 1:]] > 0).all())  # ascending among the valid entries
    trimmed, tcount = mask_to_index(mask, trim=True)
    assert trimmed.shape[-1] == int(count.max()) and torch.equal(index_to_mask(trimmed, tcount, 7), mask)
    dindex, dcount = dense_index(3, 4)
    assert dindex.shape == (1, 1, 3, 4) and bool(index_to_mask(dindex, dcount, 4).all())
    tm = token_mask(dindex, dcount, 40, 50, 16, 16)
    assert tm.shape == (1, 1, 40, 50) and bool(tm.all())


def test_reference_is_masked_softmax():
    q, k, v = (torch.randn(1, 1, 20, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    mask = torch.tensor([[[[True, False], [False, True]]]])
    index, count = mask_to_index(mask)
    ref = block_sparse_attention_reference(q, k, v, index, count, 16, 16)
    tok = token_mask(index, count, 20, 20, 16, 16)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=tok)
    assert torch.allclose(ref, expected, atol=1e-6)


def _valid_args():
    q, k, v = (torch.randn(1, 2, 40, 64) for _ in range(3))
    index, count = dense_index(3, 3)
    return dict(q=q, k=k, v=v, kv_index=index, kv_count=count, block_q=16, block_k=16)


BAD = [
    (dict(q=torch.randn(2, 40, 64)), "4-D"),
    (dict(k=torch.randn(1, 2, 40, 32), v=torch.randn(1, 2, 40, 32)), "matching q"),
    (dict(v=torch.randn(1, 2, 41, 64)), "matching q"),
    (dict(q=torch.randn(1, 2, 40, 64, dtype=torch.float64)), "dtype"),
    (dict(k=torch.randn(1, 2, 40, 64).half()), "dtype"),
    (dict(q=torch.randn(1, 2, 40, 512), k=torch.randn(1, 2, 40, 512), v=torch.randn(1, 2, 40, 512)), "head dim"),
    (dict(block_q=24), "power of two"),
    (dict(block_k=8), "power of two"),
    (dict(kv_index=torch.zeros(1, 1, 3, 3, dtype=torch.int64)), "int32"),
    (dict(kv_count=torch.zeros(1, 1, 3)), "int32"),
    (dict(kv_index=torch.zeros(1, 1, 4, 3, dtype=torch.int32)), "disagree"),
    (dict(kv_index=torch.zeros(1, 1, 4, 3, dtype=torch.int32), kv_count=torch.zeros(1, 1, 4, dtype=torch.int32)),
     "query blocks"),
    (dict(kv_index=torch.zeros(1, 3, 3, 3, dtype=torch.int32), kv_count=torch.zeros(1, 3, 3, dtype=torch.int32)),
     "batch/head"),
]


@pytest.mark.parametrize("bad,match", BAD, ids=[m + str(i) for i, (_, m) in enumerate(BAD)])
def test_invalid_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(**{**_valid_args(), **bad})


@pytest.mark.skipif(CUDA, reason="CPU-only check")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from fastdiff.kernels import runtime

    monkeypatch.setattr(runtime, "is_interpreted", lambda fn: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        block_sparse_attention(**_valid_args())


# -- GPU only: bf16 (its tl.dot is wrong in the interpreter) and real shapes -------------------------------------------
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_real_shapes(d, dtype):
    n, block = 4096 + 77, 64
    q, k, v = _qkv(n, n, d, dtype, b=1, h=4)
    qb = num_blocks(n, block)
    dindex, dcount = dense_index(qb, qb, device=DEVICE)
    dense = block_sparse_attention(q, k, v, dindex, dcount, block, block)
    assert rel_err(dense, F.scaled_dot_product_attention(q, k, v)) < TOL[dtype]
    index, count = _layout("random", (1, 4), qb, qb, seed=2)
    out = block_sparse_attention(q, k, v, index, count, block, block)
    mask = token_mask(index, count, n, n, block, block)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_err(out, ref) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("block_q,block_k", [(128, 64), (128, 128), (64, 32)])
def test_gpu_block_sizes_bf16(block_q, block_k):
    q, k, v = _qkv(1000, 1500, 128, torch.bfloat16, b=1, h=2)
    index, count = _layout("random", (1, 2), num_blocks(1000, block_q), num_blocks(1500, block_k), seed=4)
    out = block_sparse_attention(q, k, v, index, count, block_q, block_k, scale=1 / math.sqrt(100))
    ref = block_sparse_attention_reference(q, k, v, index, count, block_q, block_k, scale=1 / math.sqrt(100))
    assert rel_err(out, ref) < TOL[torch.bfloat16]
