"""The Host protocol is all a mechanism uses: a cache and telemetry run under a hand-written host that is not the
Session (as a ComfyUI host will be), and a hook outside a denoiser call is handed None and leaves the call alone."""

import torch

import fastdiff
from fastdiff import host as _host
from fastdiff.clock import CallRecord
from fastdiff.context import RunState, StepContext, TokenLayout
from fastdiff.hooks import HookSet
from fastdiff.mechanisms.caching import StepCache
from fastdiff.mechanisms.telemetry import Telemetry

from .toy import ToyDenoiser


class MiniHost:
    """A host of its own: hooks, one call at a time, a RunState."""

    def __init__(self):
        self.hooks, self.store, self.call = HookSet(), RunState(), None

    def wrap(self, module, name, hook):
        self.hooks.wrap(module, name, lambda inner, a, k: hook(self.call, inner, a, k))

    def state(self, call, mechanism, slot=None):
        return self.store.get(mechanism.name, call.ctx.call if slot is None else slot, call.ctx.grid,
                              mechanism.new_state)

    def states(self, mechanism):
        return self.store.of(mechanism.name)

    def run_rows(self, call, rows):
        _host.run_rows(call, rows)


def test_mechanisms_run_under_any_host_of_the_protocol():
    model = ToyDenoiser()
    adapter = fastdiff.adapters.resolve(model)
    mini = MiniHost()
    cache = StepCache(fastdiff.CacheConfig(policy="static", interval=2, warmup=1))
    telemetry = Telemetry(fastdiff.TelemetryConfig())
    for m in (telemetry, cache):
        m.validate(adapter)
        m.attach(adapter, mini)
    x = torch.ones(1, 1, 2, 2)
    records = []
    for step in range(4):
        ctx = StepContext(0, step, 4, 900.0 - step, 0, ("?",), TokenLayout((1, 2, 2)))
        mini.call = _host.Call(CallRecord(ctx), {"hidden_states": x})
        assert torch.equal(model(x), x * 8)  # a reused span stands in exactly (x * 8 - x added back to x)
        records.append(mini.call.record)
    assert [r.decisions["cache"] for r in records] == ["compute", "compute", "reuse", "compute"]
    assert [sorted(r.blocks) for r in records] == [[0, 1, 2], [0, 1, 2], [], [0, 1, 2]]
    assert cache.report(records)["cache_bytes"] > 0  # the host holds the state, per call slot and grid
    mini.call = None  # a module run outside a denoiser call: every hook is handed None and stays out of it
    assert torch.equal(model(x), x * 8) and sorted(records[-1].blocks) == [0, 1, 2]
    mini.hooks.remove()
    assert "forward" not in model.__dict__


def test_run_rows_keeps_the_record_dense_and_the_context_of_the_rows_that_run():
    ctx = StepContext(0, 0, 2, 1.0, 0, ("cond", "cond", "uncond", "uncond"), None)
    call = _host.Call(CallRecord(ctx), {})
    _host.run_rows(call, [0, 1])
    assert call.ctx.branches == ("cond", "cond") and call.record.ctx is ctx  # the clock's record is not rewritten
    assert call.record.rows == (0, 1) and call.record.branches == ("cond", "cond")
