"""Samplers: how the reverse chain of a process runs, by config.sampling.sampler.

A sampler takes a process (processes.py) and the config, and runs the chain from the prior's
grid point down to the data with a given noise sequence. A new sampler is a subclass of Sampler
registered under its name (`register`); every job that samples then offers it.
"""

import abc

import jax.numpy as jnp

from ihdm_jax import errors
from ihdm_jax import registry
from ihdm_jax import sampling


class Sampler(abc.ABC):
    """The reverse chain of `process` on its grid of config.sampling.steps steps (0: every
    level); `steps` is the grid's number of steps, and grid point i − 1 follows i."""

    name: str  # config.sampling.sampler

    def __init__(self, process, config):
        self.process = process
        self.grid = process.grid(config.sampling.steps)
        self.steps = len(self.grid) - 1

    @classmethod
    def check(cls, config):
        """errors.UserError if the config's sampling settings do not suit the sampler."""

    @abc.abstractmethod
    def step(self, f, u, i, delta, eps):
        """The state at grid point i − 1 from u at grid point i (a traced int32), given the
        step's unit noise eps."""

    def __call__(self, f, u, delta, noise, record=(), start=None, stop=0):
        """(u at grid point `stop`, the states at the grid points `record`) of the chain from
        u at grid point `start` (default: the prior's, `steps`), the noise of grid point i
        being noise(i) (sampling.chain)."""
        return sampling.chain(
            lambda v, i, eps: self.step(f, v, i, delta, eps),
            u,
            self.steps if start is None else start,
            noise,
            record,
            stop,
        )


REGISTRY = registry.Registry('sampling.sampler')
register = REGISTRY.register


def check(config):
    REGISTRY.lookup(config).check(config)


def from_config(process, config) -> Sampler:
    return REGISTRY.lookup(config)(process, config)


@register
class Ancestral(Sampler):
    """Each step a draw of the process's reverse step p(u_s | u_t) between neighbouring grid
    points: Alg. 2 for the heat process, the ancestral sampler of Ho et al. (Alg. 2) for the
    diffusion processes."""

    name = 'ancestral'

    def step(self, f, u, i, delta, eps):
        grid = jnp.asarray(self.grid)
        return self.process.reverse_step(f, u, grid[i], grid[i - 1], delta, eps)


@register
class Ddim(Sampler):
    """Song et al.'s DDIM family (ICLR 2021), process.ddim_step with η = config.sampling.eta:
    η = 1 the ancestral step's marginals with fresh noise, η = 0 deterministic (for the heat
    process the exponential integrator of its probability-flow ODE)."""

    name = 'ddim'

    def __init__(self, process, config):
        super().__init__(process, config)
        self.eta = config.sampling.eta

    @classmethod
    def check(cls, config):
        eta = config.sampling.eta
        if not 0.0 <= eta <= 1.0:
            raise errors.UserError(f'config.sampling.eta={eta} must lie in [0, 1].')

    def step(self, f, u, i, delta, eps):
        grid = jnp.asarray(self.grid)
        return self.process.ddim_step(f, u, grid[i], grid[i - 1], self.eta, delta, eps)
