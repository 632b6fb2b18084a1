"""attention.dispatch: every backend computes the attention the block lists mean (checked against a brute-force
token-mask reference), over odd sizes, shared and per-(batch, head) patterns, empty rows and key masks."""

import math

import pytest
import torch

from fastdiff.attention import dispatch, route
from fastdiff.errors import FastDiffError

SLOW_BACKENDS = ("gather", "flex", "sdpa")


def brute(q, k, v, index, count, block, key_mask=None):
    """Dense softmax over exactly the allowed (query, key) pairs, built token by token from the lists."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    index, count = index.expand(b, h, *index.shape[2:]), count.expand(b, h, count.shape[-1])
    allowed = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(math.ceil(nq / block)):
                for j in index[bi, hi, qb, : count[bi, hi, qb]].tolist():
                    allowed[bi, hi, qb * block:(qb + 1) * block, j * block:(j + 1) * block] = True
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.double()).to(q.dtype)


def random_lists(b, h, nq, nk, block, density, seed, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    qb, kb = math.ceil(nq / block), math.ceil(nk / block)
    mask = torch.rand(b, h, qb, kb, generator=g) < density
    mask[..., 0, 0] = True
    if empty_row:
        mask[..., -1, :] = False
    return dispatch.mask_to_index(mask, trim=True)


@pytest.mark.parametrize("nq,nk,d", [(63, 63, 16), (200, 200, 32), (257, 257, 64), (70, 130, 16)])
@pytest.mark.parametrize("shared", [True, False])
def test_backends_match_brute_force(nq, nk, d, shared):
    torch.manual_seed(0)
    b, h, block = 2, 3, 16
    q, k, v = (torch.randn(b, h, n, d) for n in (nq, nk, nk))
    index, count = random_lists(1 if shared else b, 1 if shared else h, nq, nk, block, 0.4, seed=nq + d,
                                empty_row=not shared)
    want = brute(q, k, v, index, count, block)
    sparse = dispatch.BlockSparse(index, count, block)
    for name in SLOW_BACKENDS:
        got = dispatch.attention(q, k, v, sparse, backend=name)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_key_mask_and_all_blocks():
    torch.manual_seed(1)
    b, h, n, d, block = 2, 2, 100, 16, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    key_mask = torch.ones(b, n, dtype=torch.bool)
    key_mask[1, 90:] = False  # padding keys of the second sample
    kb = math.ceil(n / block)
    index = torch.arange(kb, dtype=torch.int32).expand(1, 1, kb, kb).contiguous()
    count = torch.full((1, 1, kb), kb, dtype=torch.int32)
    dense = dispatch.sdpa(q, k, v, attn_mask=key_mask[:, None, None, :])
    for name in SLOW_BACKENDS:  # every block listed: dense attention
        got = dispatch.attention(q, k, v, dispatch.BlockSparse(index, count, block), key_mask=key_mask, backend=name)
        torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5, msg=name)
    index, count = random_lists(1, 1, n, n, block, 0.3, seed=5)
    want = brute(q, k, v, index, count, block, key_mask)
    for name in SLOW_BACKENDS:
        got = dispatch.attention(q, k, v, dispatch.BlockSparse(index, count, block), key_mask=key_mask, backend=name)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_dense_mask_is_the_lists():
    index, count = random_lists(1, 2, 50, 40, 16, 0.5, seed=3)
    mask = dispatch.token_mask(index, count, 50, 40, 16, 16)
    for h in range(2):
        for qb in range(4):
            listed = set(index[0, h, qb, : count[0, h, qb]].tolist())
            for kb in range(3):
                assert bool(mask[0, h, qb * 16, kb * 16]) == (kb in listed)


def test_backend_choice_and_override(monkeypatch):
    q = torch.randn(1, 1, 8, 16)
    assert dispatch.choose(q) == "gather"  # CPU: the torch path that skips work
    monkeypatch.setenv(dispatch.ENV, "flex")
    assert dispatch.choose(q) == "flex"
    assert dispatch.choose(q, backend="sdpa") == "sdpa"  # an explicit choice beats the environment
    monkeypatch.setenv(dispatch.ENV, "cuda-magic")
    with pytest.raises(FastDiffError, match="unknown"):
        dispatch.choose(q)
    monkeypatch.delenv(dispatch.ENV)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # restored after the test (kernels may run interpreted later)
        with pytest.raises(FastDiffError, match="triton"):
            dispatch.choose(q, backend="triton")
    with pytest.raises(FastDiffError, match="key mask"):
        if dispatch._triton_ready() is None:
            dispatch.choose(q, torch.ones(1, 8, dtype=torch.bool), backend="triton")
        else:
            raise FastDiffError("no triton here: the key mask refusal is tested where it can run")


def test_route_only_inside_handling():
    """The routed SDPA calls a handler only inside `handling`; outside (or after uninstall) it is torch's own."""
    import torch.nn.functional as F

    q = torch.randn(1, 2, 8, 16)
    calls = []
    route.install()
    try:
        assert F.scaled_dot_product_attention is not dispatch._sdpa
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q), dispatch.sdpa(q, q, q), rtol=0, atol=0)
        with route.handling(lambda *a: calls.append(a) or torch.zeros(1)):
            assert F.scaled_dot_product_attention(q, q, q).shape == (1,)
        assert len(calls) == 1
    finally:
        route.uninstall()
    assert F.scaled_dot_product_attention is dispatch._sdpa


def test_triton_backend_agrees():
    """The fused kernel (real GPU, else Triton's interpreter: small fp32 shapes) through dispatch."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        from fastdiff.kernels.runtime import use_interpreter

        use_interpreter()  # what tests/kernels does for the whole session: kernels decorated for the interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    b, h, n, d, block = 1, 2, 63, 32, 16
    q, k, v = (torch.randn(b, h, n, d, device=device) for _ in range(3))
    index, count = random_lists(1, h, n, n, block, 0.5, seed=9, empty_row=True)
    want = brute(q.cpu(), k.cpu(), v.cpu(), index, count, block)
    sparse = dispatch.BlockSparse(index.to(device), count.to(device), block)
    got = dispatch.attention(q, k, v, sparse, backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_config_names_the_backends_the_dispatch_implements():
    """config.py validates sparse.backend without importing the dispatch: its list must be the dispatch's."""
    from fastdiff.config import SPARSE_BACKENDS

    assert SPARSE_BACKENDS == dispatch.BACKENDS
