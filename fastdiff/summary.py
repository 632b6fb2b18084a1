"""Summary of the last sampling run: per step and per block decisions, tokens, estimated FLOPs — built from the
run's call records (`clock.CallRecord`) and what each denoiser's adapter and cost model say of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .clock import CallRecord


@dataclass
class StepRow:
    step: int
    timestep: float
    calls: int
    branches: list[str]
    image_tokens: int | None
    text_tokens: int | None
    blocks_computed: int | None  # summed over the calls of the step; None without telemetry
    blocks_total: int
    flops: float | None
    dense_flops: float | None
    decisions: list[str] = field(default_factory=list)  # per call: what the mechanisms decided, e.g. "cache=reuse"
    stage: int = 0  # the stage of the run the step belongs to (`step` is the run's, counting on across stages)
    stage_step: int = 0  # the step within its stage


@dataclass
class Summary:
    family: str
    model: str
    config: str
    run: int
    steps: int
    num_steps: int | None
    calls: int
    per_step: list[StepRow] = field(default_factory=list)
    per_block: dict[str, int] = field(default_factory=dict)  # block path -> calls in which it ran
    flops: float | None = None
    dense_flops: float | None = None
    mechanisms: dict[str, dict] = field(default_factory=dict)  # mechanism name -> its report()
    # Context parallelism (fastdiff.parallel): the ranks the tokens are sharded over. `flops` are the whole model's,
    # on every rank alike (decisions agree); each rank computes its 1/ranks share of them (`flops_per_rank`).
    ranks: int = 1
    stages: int = 1  # stages of the run (`Session.begin_stage`); per_step holds every stage's steps

    @property
    def flops_per_rank(self) -> float | None:
        return None if self.flops is None else self.flops / self.ranks

    @property
    def estimated_speedup(self) -> float | None:
        if not self.flops or self.dense_flops is None:
            return None
        return self.dense_flops / self.flops

    def to_dict(self) -> dict:
        return {**asdict(self), "estimated_speedup": self.estimated_speedup, "flops_per_rank": self.flops_per_rank}

    @classmethod
    def build(cls, records: Sequence[CallRecord], parts: Sequence[Any], *, config: str, tracked: bool, ranks: int,
              priced: bool) -> "Summary":
        """The summary of `records` (one run's calls, in call order).

        Args:
            parts: the denoisers that made them, primary first: each with `name`, `adapter`, `control`,
                `cost_model` and `mechanisms` (whose `report(records)` of the part's records is shown).
            config: the config as a string.
            tracked: telemetry recorded which blocks ran (else every block is counted as run).
            ranks: context-parallel ranks the tokens were sharded over.
            priced: FLOPs can be priced (every part has a cost model, and the records saw whole calls).
        """
        primary = parts[0]
        parts = {p.name: p for p in parts}
        named = len(parts) > 1  # blocks of several denoisers: "transformer_2:blocks.3"
        have_cost = priced
        rows: dict[int, StepRow] = {}
        per_block = {(f"{p.name}:" if named else "") + b.path: 0
                     for p in parts.values() if not p.control for b in p.adapter.blocks}
        total = dense_total = 0.0
        for rec in records:
            ctx = rec.ctx
            part = parts[rec.part]
            blocks = part.adapter.blocks
            prefix = f"{part.name}:" if named else ""
            dense = flops = None
            if have_cost:
                cost = part.cost_model
                per = cost.block_flops(ctx.layout)
                dense = ctx.batch_size * sum(per if rec.dense_layout is None else cost.block_flops(rec.dense_layout))
                if rec.reductions:  # submodules that ran on fewer tokens (merging) are priced as they ran
                    per = cost.block_flops(ctx.layout, rec.reductions)
                ran = rec.blocks.keys() if tracked and not part.control else range(len(blocks))
                flops = len(rec.branches) * (per[-1] + sum(per[i] for i in ran))
                total += flops
                dense_total += dense
            for i in rec.blocks:
                per_block[prefix + blocks[i].path] += 1
            row = rows.get(ctx.step)
            if row is None:
                row = rows[ctx.step] = StepRow(ctx.step, ctx.timestep, 0, [], None, None, 0 if tracked else None,
                                               0, 0.0 if have_cost else None, 0.0 if have_cost else None,
                                               stage=ctx.stage, stage_step=ctx.stage_step)
                if ctx.layout is not None:
                    row.image_tokens, row.text_tokens = ctx.layout.image_tokens, ctx.layout.text_tokens
            if not part.control:  # a ControlNet's calls add FLOPs, not denoiser calls
                row.calls += 1
                row.decisions.append(",".join(f"{k}={v}" for k, v in rec.decisions.items()))
                row.branches.append("/".join(sorted(set(rec.branches))))
                row.blocks_total += len(blocks)
                if tracked:
                    row.blocks_computed += len(rec.blocks)
            if have_cost:
                row.flops += flops
                row.dense_flops += dense
        last = records[-1].ctx if records else None
        return cls(
            family=primary.adapter.name,
            model=type(primary.denoiser).__name__,
            config=config,
            run=last.run if last else -1,
            steps=len(rows),
            num_steps=last.num_steps if last else None,
            calls=sum(not parts[r.part].control for r in records),
            per_step=[rows[k] for k in sorted(rows)],
            per_block=per_block if tracked else {},
            flops=total if have_cost and records else None,
            dense_flops=dense_total if have_cost and records else None,
            mechanisms={(f"{p.name}:" if named else "") + m.name: r
                        for p in parts.values() for m in p.mechanisms
                        if (r := m.report([rec for rec in records if rec.part == p.name]))},
            ranks=ranks,
            stages=last.stage + 1 if last else 1,
        )

    def __str__(self) -> str:
        head = (f"fastdiff summary: {self.model} ({self.family}), config {self.config}, run {self.run}: "
                f"{self.steps} steps, {self.calls} denoiser calls")
        staged = self.stages > 1  # a stage column (and count) only for runs of several stages
        head += f", {self.stages} stages" if staged else ""
        lines = [head, ("stage " if staged else "") + f"{'step':>4} {'t':>9} {'calls':>5} {'branches':<16} {'tokens':>11} "
                       f"{'blocks':>9} {'GFLOPs':>10} {'dense':>10}  decisions"]
        for r in self.per_step:
            tok = "-" if r.image_tokens is None else f"{r.image_tokens}+{r.text_tokens}"
            blk = "-" if r.blocks_computed is None else f"{r.blocks_computed}/{r.blocks_total}"
            gf = "-" if r.flops is None else f"{r.flops / 1e9:.3f}"
            gd = "-" if r.dense_flops is None else f"{r.dense_flops / 1e9:.3f}"
            lines.append((f"{r.stage:>5} " if staged else "") + f"{r.step:>4} {r.timestep:>9.3f} {r.calls:>5} "
                         f"{','.join(r.branches):<16} {tok:>11} {blk:>9} {gf:>10} {gd:>10}  "
                         f"{' | '.join(d for d in r.decisions if d)}")
        if self.estimated_speedup is not None:
            lines.append(f"estimated FLOPs {self.flops / 1e9:.3f} G vs dense {self.dense_flops / 1e9:.3f} G "
                         f"-> {self.estimated_speedup:.2f}x")
        if self.ranks > 1:
            per = (f": {self.flops_per_rank / 1e9:.3f} G FLOPs per rank" if self.flops is not None else
                   " (FLOPs not priced: fastdiff was applied before enable_parallelism and saw one shard; apply after "
                   "it to price them)")
            lines.append(f"context parallel over {self.ranks} ranks, each computing 1/{self.ranks} of every call{per}")
        for name, rep in self.mechanisms.items():
            lines.append(f"{name}: " + ", ".join(f"{k}={_fmt(k, v)}" for k, v in rep.items()))
        return "\n".join(lines)


def _fmt(key: str, value) -> str:
    if key.endswith("bytes") and isinstance(value, int):
        return f"{value / 2**20:.2f} MiB"
    return str(value)
