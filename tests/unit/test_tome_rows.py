"""ToMe's merge/unmerge move rows by index_select/index_add_ on the flattened batch: exactly gather/scatter_add_
along the token dimension (the same copies, the same additions in the same order), for every dtype and layout."""

import pytest
import torch

from fastdiff.mechanisms.merging import tome


def _reference(m, x):
    ex = lambda i: i.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # noqa: E731
    out = x.gather(1, ex(m.kept))
    delta = x.gather(1, ex(m.src)) - x.gather(1, ex(m.src_dst))
    share = m.sizes.gather(1, m.src_slot).to(x.dtype).unsqueeze(-1)
    return out.scatter_add_(1, ex(m.src_slot), delta / share)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unmerge_are_the_gathers_and_scatter_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9 * 11, 16, generator=g).to(dtype)
    protect = torch.rand(3, 99, generator=g) < 0.2
    m = tome.match(x, (1, 9, 11), 60, protect=protect)
    merge, unmerge = tome.merge_pair(m)
    assert torch.equal(merge(x), _reference(m, x))
    sliced = torch.randn(3, 104, 16, generator=g).to(dtype)[:, 5:]  # not contiguous, as text-first sites pass it
    assert torch.equal(merge(sliced), _reference(m, sliced))
    y = torch.randn(3, 99 - 60, 16, generator=g).to(dtype)
    assert torch.equal(unmerge(y), y.gather(1, m.slot.unsqueeze(-1).expand(-1, -1, 16)))
    with pytest.raises(ValueError, match="2 row"):
        tome.merge_pair(tome.match(x[:2], (1, 9, 11), 60))[0](x)
