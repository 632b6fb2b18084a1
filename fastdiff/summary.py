"""Summary of the last sampling run: per step and per block decisions, tokens, estimated FLOPs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .parallel import sees_shards, shards_of

if TYPE_CHECKING:
    from .session import Session


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
    def build(cls, session: "Session") -> "Summary":
        records = session.records
        parts = {p.name: p for p in session.parts}
        named = len(parts) > 1  # blocks of several denoisers: "transformer_2:blocks.3"
        tracked = session.config.telemetry is not None and session.config.telemetry.enabled
        # Applied before enable_parallelism, fastdiff's clock sits under diffusers' split of the inputs and saw one
        # rank's shard, from which the whole model's FLOPs cannot be priced exactly (attention spans all tokens).
        ranks = shards.degree if (shards := shards_of(session.denoiser)) is not None else 1
        have_cost = session.accounted_fully and not (ranks > 1 and sees_shards(session.denoiser))
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
                dense = (rec.dense_rows or ctx.batch_size) * sum(per)
                if rec.reductions:  # submodules that ran on fewer tokens (merging) are priced as they ran
                    per = cost.block_flops(ctx.layout, rec.reductions)
                ran = rec.blocks.keys() if tracked and not part.control else range(len(blocks))
                flops = ctx.batch_size * (per[-1] + sum(per[i] for i in ran))
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
                row.branches.append("/".join(sorted(set(ctx.branches))))
                row.blocks_total += len(blocks)
                if tracked:
                    row.blocks_computed += len(rec.blocks)
            if have_cost:
                row.flops += flops
                row.dense_flops += dense
        last = records[-1].ctx if records else None
        return cls(
            family=session.adapter.name,
            model=type(session.denoiser).__name__,
            config=session.strify(),
            run=last.run if last else -1,
            steps=len(rows),
            num_steps=last.num_steps if last else None,
            calls=sum(not parts[r.part].control for r in records),
            per_step=[rows[k] for k in sorted(rows)],
            per_block=per_block if tracked else {},
            flops=total if have_cost and records else None,
            dense_flops=dense_total if have_cost and records else None,
            mechanisms={(f"{p.name}:" if named else "") + m.name: r
                        for p in parts.values() for m in p.mechanisms if (r := m.report())},
            ranks=ranks,
            stages=last.stage + 1 if last else 1,
        )

    def __str__(self) -> str:
        head = (f"fastdiff summary: {self.model} ({self.family}), config {self.config}, run {self.run}: "
                f"{self.steps} steps, {self.calls} denoiser calls" + (f", {self.stages} stages" if self.stages > 1 else ""))
        staged = self.stages > 1
        lines = [head, ("stage " if staged else "") + f"{'step':>4} {'t':>9} {'calls':>5} {'branches':<16} {'tokens':>11} {'blocks':>9} "
                       f"{'GFLOPs':>10} {'dense':>10}  decisions"]
        for r in self.per_step:
            tok = "-" if r.image_tokens is None else f"{r.image_tokens}+{r.text_tokens}"
            blk = "-" if r.blocks_computed is None else f"{r.blocks_computed}/{r.blocks_total}"
            gf = "-" if r.flops is None else f"{r.flops / 1e9:.3f}"
            gd = "-" if r.dense_flops is None else f"{r.dense_flops / 1e9:.3f}"
            lines.append((f"{r.stage:>5} " if staged else "") + f"{r.step:>4} {r.timestep:>9.3f} {r.calls:>5} {','.join(r.branches):<16} {tok:>11} "
                         f"{blk:>9} {gf:>10} {gd:>10}  {' | '.join(d for d in r.decisions if d)}")
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
