"""remove() and the model's lifetime (issue 17 item 12): the SDPA router beside other libraries' patches and across
garbage collection, nothing of a run held through the handle after remove(), a hooked module replaced after apply,
and diffusers' model CPU offload (accelerate hooks) before or after apply."""

import copy
import gc
import types
import weakref

import accelerate.hooks
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, SchedulerMixin

import fastdiff
from fastdiff.attention import dispatch, route
from fastdiff.errors import FastDiffError
from fastdiff.eval import tiny
from fastdiff.hooks import HookSet

SPARSE = {"sparse": {"pattern": "window", "block": 16, "window": [1, 1, 1], "start": 0.0}}


@pytest.fixture
def clean_sdpa():
    """Each test leaves torch's SDPA as it found it, whatever it patched."""
    assert F.scaled_dot_product_attention is dispatch._sdpa and not route.installed()
    yield
    F.scaled_dot_product_attention = dispatch._sdpa


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 8, 4, generator=g) for _ in range(3)]


STEPS = 6  # cache-fast (interval 3, first and last step computed) reuses at some of them


def _big_kwargs(steps: int = STEPS) -> dict:
    kw = tiny.pipeline_kwargs("pixart", steps=steps)
    kw["height"] *= 4
    kw["width"] *= 4  # 256 tokens: cached activations are the largest tensors a run keeps
    return kw


def _run(pipe, kw=None) -> torch.Tensor:
    kw = tiny.pipeline_kwargs("pixart", steps=STEPS) if kw is None else kw  # fresh: it carries a seeded generator
    with torch.no_grad():
        return tiny.output_tensor(pipe(**kw))


# -- the SDPA router ------------------------------------------------------------------------------------------
class _Owner:
    pass


def test_uninstall_keeps_a_patch_installed_after_fastdiff(clean_sdpa):
    """(r14a) Another library patched SDPA over the router: uninstall leaves their patch, and the router it still
    calls is inert (no handler is consulted through it any more)."""
    q, k, v = _qkv()
    owner = _Owner()
    route.install(owner)
    below = F.scaled_dot_product_attention

    def theirs(*a, **kw):
        return below(*a, **kw)

    F.scaled_dot_product_attention = theirs
    route.uninstall(owner)
    assert F.scaled_dot_product_attention is theirs and not route.installed()
    calls = []
    with route.handling(lambda *a: calls.append(a) or torch.zeros(1)):
        out = F.scaled_dot_product_attention(q, k, v)
    assert calls == [] and torch.equal(out, dispatch.sdpa(q, k, v))


def test_install_over_a_prior_patch_restores_it(clean_sdpa):
    """A patch installed before fastdiff keeps serving every call no handler takes, and comes back on uninstall;
    a router left inside a later patch never loops into a new one."""
    q, k, v = _qkv()
    seen = []

    def prior(*a, **kw):
        seen.append(1)
        return dispatch.sdpa(*a, **kw)

    F.scaled_dot_product_attention = prior
    a = _Owner()
    route.install(a)
    F.scaled_dot_product_attention(q, k, v)
    with route.handling(lambda *x: torch.ones(1)):
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), torch.ones(1))
    assert len(seen) == 1
    buried = F.scaled_dot_product_attention

    def later(*x, **kw):
        return buried(*x, **kw)

    F.scaled_dot_product_attention = later
    route.uninstall(a)
    b = _Owner()
    route.install(b)  # a fresh router on top of `later` -> inert old router -> prior
    with route.handling(lambda *x: None):  # the handler declines: the call goes down the whole chain once
        out = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, dispatch.sdpa(q, k, v)) and len(seen) == 2
    route.uninstall(b)
    assert F.scaled_dot_product_attention is later


def test_router_released_when_its_owner_is_collected(clean_sdpa):
    owners = [_Owner(), _Owner()]
    for o in owners:
        route.install(o)
    route.install()  # an anonymous use, ended only by uninstall()
    del o
    owners.pop()
    gc.collect()
    assert route.installed()
    owners.pop()
    gc.collect()
    assert route.installed() and F.scaled_dot_product_attention is not dispatch._sdpa
    route.uninstall()
    assert F.scaled_dot_product_attention is dispatch._sdpa and not route.installed()


def test_uninstall_without_install_is_refused(clean_sdpa):
    with pytest.raises(RuntimeError, match="not a user"):
        route.uninstall(_Owner())
    with pytest.raises(RuntimeError, match="without a matching install"):
        route.uninstall()
    owner = _Owner()
    route.install(owner)
    with pytest.raises(RuntimeError, match="already a user"):
        route.install(owner)
    route.uninstall(owner)
    assert F.scaled_dot_product_attention is dispatch._sdpa


def test_remove_keeps_a_later_patch_end_to_end(clean_sdpa):
    """(r14a) through fastdiff.apply / remove on a sparse pipeline."""
    p = tiny.build_pipeline("pixart")
    fastdiff.apply(p, SPARSE)

    def theirs(*a, **kw):
        return dispatch.sdpa(*a, **kw)

    F.scaled_dot_product_attention = theirs
    fastdiff.remove(p)
    assert F.scaled_dot_product_attention is theirs


def test_sparse_pipeline_collected_without_remove_restores_sdpa(clean_sdpa):
    """(r14b) A sparse session that is garbage-collected without remove() leaves SDPA as it was, and the pipeline
    itself is freed (nothing fastdiff keeps, e.g. per-caller state, holds it)."""
    p = tiny.build_pipeline("pixart")
    handle = weakref.ref(fastdiff.apply(p, SPARSE))
    _run(p, tiny.pipeline_kwargs("pixart", steps=2))
    assert F.scaled_dot_product_attention is not dispatch._sdpa
    del p
    gc.collect()
    assert handle() is None
    assert F.scaled_dot_product_attention is dispatch._sdpa and not route.installed()


def test_pipeline_collected_without_remove():
    """An accelerated pipeline that ran and is dropped without remove() is freed with everything fastdiff hung
    on it: no per-caller state (e.g. a context variable's value) keeps the session, its scheduler or the model."""
    p = tiny.build_pipeline("pixart")
    h = weakref.ref(fastdiff.apply(p, preset="cache-fast"))
    _run(p, tiny.pipeline_kwargs("pixart", steps=2))
    model = weakref.ref(p.transformer)
    del p
    gc.collect()
    assert h() is None and model() is None


# -- nothing of a run stays reachable through the handle --------------------------------------------------------
def _tensors_held(root) -> list[torch.Tensor]:
    """Tensors reachable from `root`, not counting what models, pipelines and schedulers own (weights, sigmas)."""
    seen, out, todo = set(), [], [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, (torch.nn.Module, types.ModuleType, type, SchedulerMixin, DiffusionPipeline)):
            continue
        elif isinstance(obj, types.FunctionType):  # its closure, not its module's globals
            todo.extend(obj.__closure__ or ())
            todo.extend(obj.__defaults__ or ())
        else:
            todo.extend(gc.get_referents(obj))
    return out


@pytest.mark.parametrize("preset", ["cache-fast", "cache-ultra", "merge-tome"])
def test_remove_drops_every_activation(preset):
    """(r15) After remove() the handle, still held, keeps no activation-sized tensor (span inputs, cached
    residuals, merge indices) alive; before it, it does (so the walk sees them)."""
    p = tiny.build_pipeline("pixart")
    h = fastdiff.apply(p, preset=preset)
    _run(p, _big_kwargs())
    row = 256 * p.transformer.inner_dim  # one batch row of hidden states
    held = [t for t in _tensors_held(h) if t.numel() >= row]
    assert held
    refs = [weakref.ref(t) for t in held]
    del held
    fastdiff.remove(p)
    gc.collect()
    assert [t.shape for t in _tensors_held(h) if t.numel() >= row] == []
    assert all(r() is None for r in refs)
    assert h.summary() is not None  # the report survives what it described


# -- a hooked module replaced after apply --------------------------------------------------------------------
def test_hookset_check_intact_sees_a_replaced_module():
    root = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    hooks = HookSet()
    hooks.wrap(root[1][0], "t", lambda inner, a, kw: inner(*a, **kw))
    hooks.wrap(root, "t", lambda inner, a, kw: inner(*a, **kw))
    hooks.seal(root)
    hooks.check_intact()
    root[0] = torch.nn.Linear(2, 2)  # not hooked: not watched
    hooks.check_intact()
    inner = root[1]
    root[1] = torch.nn.Sequential(inner[0])  # the path to a hooked module changes, the module does not
    with pytest.raises(FastDiffError, match=r"Sequential\.1 was replaced"):
        hooks.check_intact()
    root[1] = inner
    hooks.check_intact()
    inner[0] = torch.nn.Linear(2, 2)
    with pytest.raises(FastDiffError, match=r"Sequential\.1\.0 was replaced .* fastdiff.remove"):
        hooks.check_intact()
    hooks.remove()
    hooks.check_intact()  # nothing watched after remove


@pytest.mark.parametrize("preset,path", [("cache-fast", "transformer_blocks.1"),
                                         ("merge-tome", "transformer_blocks.1"),
                                         ("merge-tome", "transformer_blocks.0.attn1")])
def test_replaced_module_is_refused_before_any_work(preset, path):
    """(r17) A hooked block (or attention module) swapped after apply: the next call raises before computing
    anything; remove() then works, and applying again gives what a correctly accelerated pipeline gives."""
    p = tiny.build_pipeline("pixart")
    parent_path, name = path.rsplit(".", 1)
    parent = p.transformer.get_submodule(parent_path)
    clean = copy.deepcopy(parent._modules[name])  # an unhooked copy, same weights
    fastdiff.apply(p, preset=preset)
    parent._modules[name] = clean
    calls = []
    hook = p.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(FastDiffError, match="replaced after fastdiff.apply"):
        _run(p)
    hook.remove()
    assert calls == []  # no block ran
    assert fastdiff.remove(p)
    assert torch.equal(_run(p), _run(tiny.build_pipeline("pixart")))
    fastdiff.apply(p, preset=preset)
    q = tiny.build_pipeline("pixart")
    fastdiff.apply(q, preset=preset)
    assert torch.equal(_run(p), _run(q))


# -- accelerate hooks (enable_model_cpu_offload) ---------------------------------------------------------------
def test_hookset_goes_under_an_accelerate_hook_and_out_again():
    m = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    want = m(x)
    seen = []
    accelerate.hooks.add_hook_to_module(m, accelerate.hooks.ModelHook())
    hooks = HookSet()
    hooks.wrap(m, "t", lambda inner, a, kw: seen.append(1) or inner(*a, **kw))
    assert torch.equal(m(x), want) and seen == [1]
    accelerate.hooks.remove_hook_from_module(m)  # diffusers' per-call cycle: remove ...
    accelerate.hooks.add_hook_to_module(m, accelerate.hooks.ModelHook())  # ... and add again
    assert torch.equal(m(x), want) and seen == [1, 1]  # still hooked, under accelerate's hook
    hooks.remove()
    assert m._old_forward.__func__ is torch.nn.Linear.forward and "_hf_hook" in m.__dict__
    assert torch.equal(m(x), want) and seen == [1, 1]

    n = torch.nn.Linear(3, 3)
    hooks = HookSet()
    hooks.wrap(n, "t", lambda inner, a, kw: inner(*a, **kw))
    accelerate.hooks.add_hook_to_module(n, accelerate.hooks.ModelHook())  # after fastdiff: on top of it
    accelerate.hooks.remove_hook_from_module(n)  # leaves fastdiff's wrapper as the forward
    hooks.remove()
    assert "forward" not in n.__dict__  # exactly as before: the class's forward


def _offload_pipeline(order: str, preset: str | None):
    p = tiny.build_pipeline("pixart")
    if order == "before":
        p.enable_model_cpu_offload(device="cpu")
    h = fastdiff.apply(p, preset=preset) if preset else None
    if order == "after":
        p.enable_model_cpu_offload(device="cpu")
    return p, h


@pytest.mark.parametrize("order", ["before", "after"])
def test_model_cpu_offload_then_remove(order):
    """(r20) With enable_model_cpu_offload before or after apply: every call stays accelerated (as without
    offload), and remove() leaves a pipeline bit-identical to a never-applied one with offload enabled."""
    plain = tiny.build_pipeline("pixart")
    fastdiff.apply(plain, preset="cache-fast")
    want = _run(plain)
    p, h = _offload_pipeline(order, "cache-fast")
    for _ in range(2):  # diffusers re-installs its hook at the end of each call
        assert torch.equal(_run(p), want)
        assert len(h.records) == STEPS  # the clock saw every call (CFG rows batched)
        assert any(r.decisions.get("cache") != "compute" for r in h.records)
    assert fastdiff.remove(p)
    assert "_hf_hook" in p.transformer.__dict__  # accelerate's hook stays, on the bare forward
    assert p.transformer._old_forward.__func__ is type(p.transformer).forward
    ref, _ = _offload_pipeline("before", None)
    assert torch.equal(_run(p), _run(ref))
