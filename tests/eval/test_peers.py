"""Peers (diffusers' cache hooks, cache-dit) on tiny real pipelines: they really skip, and the remover gives back
exactly the pipeline that was never touched."""

import importlib.util

import pytest
import torch

from fastdiff.eval import peer_backends as B
from fastdiff.eval import peers as P
from fastdiff.eval import tiny

# diffusers' FasterCache calls torch.meshgrid without indexing=: its warning, not ours
pytestmark = [pytest.mark.filterwarnings("ignore:torch.meshgrid"), pytest.mark.usefixtures("one_thread")]

STEPS = 8
DIFFUSERS_PEERS = [n for n in P.PEERS if n.startswith("diffusers-")]
CACHE_DIT_PEERS = [n for n in P.PEERS if n.startswith("cache-dit-")]
# flux: separate true-CFG calls; cogvideox: batched CFG; wan: SeaCache's only tiny family
FAMILIES = ("flux", "cogvideox", "wan")


@pytest.fixture(scope="module")
def pipes():
    """family -> (pipeline, call kwargs, plain output, plain block + attention executions), built once."""
    built = {}

    def get(family):
        if family not in built:
            pipe = tiny.build_pipeline(family, seed=0)
            kw = tiny.pipeline_kwargs(family, steps=STEPS)
            built[family] = (pipe, kw, *counted_run(pipe, kw))
        return built[family]

    return get


def run(pipe, kw) -> torch.Tensor:
    with torch.no_grad():
        return tiny.output_tensor(pipe(**B.cloned(kw)))


def counted_run(pipe, kw, name=None):
    """Output and executed blocks + attention modules of one run, with peer ``name`` at "fast" (then removed)."""
    with P.counting(B.denoiser(pipe)) as counts:
        remove = P.apply_peer(pipe, name, "fast", call_kwargs=kw) if name else None
        counts.update(calls=0, blocks=0, attn=0)  # not MagCache's calibration run
        try:
            out = run(pipe, kw)
        finally:
            if remove:
                remove()
                remove()  # a second call is a no-op
    return out, counts["blocks"] + counts["attn"]


def state(pipe) -> list:
    """What a peer could leave behind: the instance attribute names of the pipeline and of every denoiser module,
    their ``forward`` and hook dicts, and the pipeline class's attributes (a run itself rebinds values like
    ``pipe._num_timesteps``, so values are not compared)."""
    objs = [pipe, *B.denoiser(pipe).modules()]
    per_obj = [
        (
            sorted(vars(o)),
            vars(o).get("forward"),
            len(getattr(o, "_forward_hooks", ())),
            len(getattr(o, "_forward_pre_hooks", ())),
        )
        for o in objs
    ]
    return per_obj + [sorted(vars(type(pipe))), vars(type(pipe)).get("__call__")]


def supported_families(name, pipes, limit=2):
    return [f for f in FAMILIES if P.PEERS[name].supports(pipes(f)[0])][:limit]


def check_skips_and_restores(pipes, name, family):
    pipe, kw, ref, plain = pipes(family)
    before = state(pipe)
    out, executed = counted_run(pipe, kw, name)
    assert executed < plain, f"{name} on {family} skipped no computation"
    assert not torch.equal(out, ref), f"{name} on {family} changed nothing"
    assert torch.equal(run(pipe, kw), ref), f"{name} on {family}: output differs after removal"
    assert state(pipe) == before, f"{name} on {family} left attributes behind"


@pytest.mark.parametrize("name", DIFFUSERS_PEERS)
def test_diffusers_peer_skips_and_remover_restores(pipes, name):
    families = supported_families(name, pipes)
    assert families, f"{name} runs on none of {FAMILIES}"
    for family in families:
        check_skips_and_restores(pipes, name, family)


@pytest.mark.parametrize("name", CACHE_DIT_PEERS)
def test_cache_dit_peer_skips_and_remover_restores(pipes, name):
    if importlib.util.find_spec("cache_dit") is None:
        pytest.skip("cache-dit is not installed (optional peer, not a fastdiff dependency)")
    assert name in P.available()
    for family in ("flux", "cogvideox"):
        check_skips_and_restores(pipes, name, family)


def test_cache_dit_absent_is_reported_not_hidden():
    peer = P.PEERS["cache-dit-dbcache"]
    if importlib.util.find_spec("cache_dit") is not None:
        assert peer.unavailable is None and "cache-dit-dbcache" in P.available()
    else:
        assert "not installed" in peer.unavailable and "cache-dit-dbcache" not in P.available()
        with pytest.raises(P.PeerError, match="not installed"):
            P.apply_peer(object(), "cache-dit-dbcache", "fast")


def test_unsupported_family_raises_with_reason_and_touches_nothing():
    pipe = tiny.build_pipeline("sd3", seed=0)
    before = state(pipe)
    ok = P.PEERS["diffusers-fbc"].supports(pipe)
    assert not ok and "CacheMixin" in ok
    with pytest.raises(P.PeerError, match="SD3Transformer2DModel is not a diffusers CacheMixin"):
        P.apply_peer(pipe, "diffusers-fbc", "fast")
    assert state(pipe) == before


def test_failed_apply_leaves_pipeline_untouched(pipes):
    pipe, kw, ref, _ = pipes("cogvideox")
    before = state(pipe)
    with pytest.raises(P.PeerError, match="needs call_kwargs"):
        P.apply_peer(pipe, "diffusers-fastercache", "fast")  # needs the call to know the CFG layout
    assert state(pipe) == before
    assert torch.equal(run(pipe, kw), ref)


def test_magcache_calibration_does_not_advance_callers_generator(pipes):
    pipe, kw, ref, _ = pipes("flux")
    kw = dict(kw, generator=torch.Generator().manual_seed(7))
    state_before = kw["generator"].get_state()
    remove = P.apply_peer(pipe, "diffusers-magcache", "fast", call_kwargs=kw)
    remove()
    assert torch.equal(kw["generator"].get_state(), state_before)


def test_target_skip_matches_fraction(pipes):
    pipe, kw, ref, _ = pipes("flux")
    remove = P.apply_peer(pipe, "diffusers-fbc", "fast", call_kwargs=kw, target_skip=0.4)
    try:
        assert abs(remove.skip - 0.4) <= 0.1, remove.skip
        assert remove.kwargs["threshold"] > 0
    finally:
        remove()
    assert torch.equal(run(pipe, kw), ref)
    with pytest.raises(P.PeerError, match="no threshold"):
        P.apply_peer(pipe, "diffusers-taylorseer", "fast", call_kwargs=kw, target_skip=0.4)


def test_levels_and_api():
    for peer in P.PEERS.values():
        assert tuple(peer.levels) == P.LEVELS
        assert peer.source.split()[0] in ("diffusers", "cache-dit")
    assert set(DIFFUSERS_PEERS) <= set(P.available())
    with pytest.raises(KeyError):
        P.apply_peer(object(), "diffusers-fbc", "turbo")
    assert not P.Unsupported("why") and str(P.Unsupported("why")) == "why"
