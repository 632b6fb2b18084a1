"""The one timing helper (fastdiff.eval.timing): warm-up of every arm, interleaved rounds, sessions around every call,
and the flags that mark a speedup unreliable. Structure only: injected calls and a fake clock, no real timings."""

import contextlib

import pytest

from fastdiff.eval import timing


class FakeClock:
    """Each timed call of arm X takes durations[X][i] seconds on its i-th call (warm-ups included)."""

    def __init__(self, durations):
        self.durations, self.calls, self.now, self.current, self._start = durations, {}, 0.0, None, True

    def on_call(self, phase, name):
        self.current = name

    def __call__(self):
        if not self._start:
            i = self.calls.get(self.current, 0)
            self.calls[self.current] = i + 1
            self.now += self.durations[self.current][i]
        self._start = not self._start
        return self.now


def _arms(trace, names=("baseline", "A", "B")):
    def make(name):
        @contextlib.contextmanager
        def session():
            trace.append(("enter", name))
            yield f"state-{name}"
            trace.append(("exit", name))

        def call(prepared):
            trace.append(("call", name, prepared))
            return f"out-{name}"

        return timing.Arm(name, call, prepare=lambda: f"kw-{name}", session=session,
                          finish=lambda state: trace.append(("finish", name, state)) or f"summary-{name}")

    return [make(n) for n in names]


def test_every_arm_is_warmed_up_then_rounds_interleave():
    trace, phases = [], []
    res = timing.interleaved(_arms(trace), 3, warmup=1, on_call=lambda p, n: phases.append((p, n)))
    # warm-up of every arm first, then A B C A B C A B C
    assert phases == [("warmup", n) for n in ("baseline", "A", "B")] + [("timed", n) for n in ("baseline", "A", "B")] * 3
    calls = [t[1] for t in trace if t[0] == "call"]
    assert calls == ["baseline", "A", "B"] * 4
    # each call inside its own session, with its own prepared input; finish once, inside the last session
    assert trace[:3] == [("enter", "baseline"), ("call", "baseline", "kw-baseline"), ("exit", "baseline")]
    finishes = [i for i, t in enumerate(trace) if t[0] == "finish"]
    assert [trace[i] for i in finishes] == [("finish", n, f"state-{n}") for n in ("baseline", "A", "B")]
    for i in finishes:
        assert trace[i - 1][0] == "call" and trace[i + 1] == ("exit", trace[i][1])
    assert all(t.warmups == 1 and len(t.times) == 3 and t.output == f"out-{n}" and t.extra == f"summary-{n}"
               for n, t in res.items())


def test_warmup_time_is_not_counted_and_times_are_per_round():
    clock = FakeClock({"baseline": [50.0, 2.0, 2.1, 1.9], "A": [9.0, 1.0, 1.0, 1.0]})  # cold first calls
    res = timing.interleaved(_arms([], ("baseline", "A")), 3, clock=clock, on_call=clock.on_call)
    assert res["baseline"].times == pytest.approx([2.0, 2.1, 1.9]) and res["A"].times == pytest.approx([1.0] * 3)
    assert res["baseline"].median == pytest.approx(2.0) and res["baseline"].spread == pytest.approx(0.1)
    s = timing.compare(res["baseline"], res["A"], bound=2.5)
    assert s.ratio == pytest.approx(2.0) and (s.low, s.high) == pytest.approx((1.9, 2.1))
    assert s.reliable and s.flags == []


def test_a_speedup_above_the_flops_bound_is_flagged():
    # what a cold baseline does: 7x measured where the accounting allows 1.82x
    clock = FakeClock({"baseline": [1.0, 7.0, 7.0, 7.0], "A": [1.0, 1.0, 1.0, 1.0]})
    res = timing.interleaved(_arms([], ("baseline", "A")), 3, clock=clock, on_call=clock.on_call)
    s = timing.compare(res["baseline"], res["A"], bound=1.82)
    assert s.ratio == pytest.approx(7.0) and not s.reliable
    assert s.flags == ["7.00x above the FLOPs bound 1.82x"] and "UNRELIABLE" in s.cell()
    assert timing.compare(res["baseline"], res["A"], bound=7.5).reliable  # within the bound: not flagged


def test_a_wide_spread_and_too_few_rounds_are_flagged():
    wide = timing.compare(timing.Timing("b", [1.0, 1.0, 1.3]), timing.Timing("a", [0.5, 0.5, 0.5]), bound=3.0)
    assert wide.flags == ["spread 30% > 20%"]
    narrow = timing.compare(timing.Timing("b", [1.0, 1.0, 1.19]), timing.Timing("a", [0.5, 0.5, 0.5]), bound=3.0)
    assert narrow.reliable
    few = timing.compare(timing.Timing("b", [1.0]), timing.Timing("a", [0.5]), bound=3.0)
    assert not few.reliable and "1 timed round(s) < 3" in few.note


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved(_arms([]), 0)
    with pytest.raises(ValueError, match="share a name"):
        timing.interleaved(_arms([], ("A", "A")), 3)
