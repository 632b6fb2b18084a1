"""Telemetry: the first tenant of the Mechanism interface. Records which blocks ran in each call and
how many tokens each saw; `summary()` is built from it. It changes no output."""

from __future__ import annotations

from ..hooks import Args
from .base import Mechanism


class Telemetry(Mechanism):
    name = "telemetry"

    def estimate_cost(self, table):
        return table

    def attach(self, adapter, host):
        self.host = host
        for block in adapter.blocks:
            host.wrap(block.module, f"fastdiff.telemetry.{block.path}", self._recorder(block))

    def _recorder(self, block):
        args_of, arg = Args(block.module), block.io.hidden_arg

        def record(call, inner, args, kwargs):
            if call is not None:
                hidden = args_of.get(args, kwargs, arg)
                # tokens seen: sequence length for (B, N, C) inputs, spatial size for (B, C, H, W) UNet maps
                n = hidden.shape[1] if hidden.ndim == 3 else hidden[0, 0].numel() if hidden.ndim >= 4 else 0
                call.record.blocks[block.index] = int(n)
            return inner(*args, **kwargs)

        return record
