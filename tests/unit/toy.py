"""An analytic toy denoiser (blocks compute x * 2) registered as a family: adding a family is data."""

import torch

from fastdiff.adapters.base import BlockList, FamilySpec, IOPattern, register, tensor_layout


class Double(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states * 2


class ToyDenoiser(torch.nn.Module):
    def __init__(self, n_blocks: int = 3):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(Double() for _ in range(n_blocks))
        self.config = None

    def forward(self, hidden_states, timestep=None):
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states)
        return hidden_states + 0 * torch.as_tensor(timestep if timestep is not None else 0.0)


class AddStep(torch.nn.Module):
    """x -> x + t: the residual is the call's timestep, which is linear in the step index."""

    t = 0.0

    def forward(self, hidden_states):
        return hidden_states + self.t


class ShiftDenoiser(ToyDenoiser):
    def __init__(self, n_blocks: int = 3):
        super().__init__(n_blocks)
        self.transformer_blocks = torch.nn.ModuleList(AddStep() for _ in range(n_blocks))

    def forward(self, hidden_states, timestep=None):
        for block in self.transformer_blocks:
            block.t = float(timestep) / 1000
        return super().forward(hidden_states, timestep)


class FakeScheduler:
    """The two scheduler methods the clock listens to, with diffusers' signatures."""

    def __init__(self):
        self.timesteps = torch.tensor([])
        self.stepped = 0

    def set_timesteps(self, num_inference_steps, device=None):
        self.timesteps = torch.linspace(1000, 0, num_inference_steps + 1)[:-1]

    def step(self, model_output, timestep, sample, eta=0.0, return_dict=True):
        self.stepped += 1
        return (sample - model_output * 0.01,)


class FakePipeline:
    def __init__(self, denoiser):
        self.transformer = denoiser
        self.scheduler = FakeScheduler()

    @property
    def components(self):
        return {"transformer": self.transformer, "scheduler": self.scheduler}

    def __call__(self, steps=4, x=None, heun=False):
        x = torch.ones(1, 1, 4, 4) if x is None else x
        self.scheduler.set_timesteps(steps)
        ts = self.scheduler.timesteps
        if heun:  # second-order: two evaluations per step at t_i and t_{i+1}, step() after each
            ts = [ts[0]] + [t for t in ts[1:] for _ in range(2)]
        for t in ts:
            x = self.scheduler.step(self.transformer(x, timestep=t), t, x)[0]
        return x


register(FamilySpec(
    name="toy",
    classes=("ToyDenoiser", "ShiftDenoiser"),
    block_lists=(BlockList("transformer_blocks", "transformer", IOPattern(encoder_arg=None)),),
    layout=tensor_layout("BCHW", lambda cfg, f, h, w: (f, h, w), "none"),
    latent_grid=lambda cfg, f, h, w: (f, h, w),
))
