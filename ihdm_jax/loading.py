"""A trained run as a Python object, for research code: `ihdm_jax.load(workdir)`.

model = ihdm_jax.load('runs/digits')
model.config                    # the run's config (from <workdir>/config.json)
model.f(u, k)                   # the EMA residual f(u, k); μ(u, k) = u + f(u, k)
model.sample(jax.random.key(0), 16)  # Alg. 2: float32 samples (16, H, W, C)
model.sample(key, 16, sampler='ddim', steps=10)  # another sampler (a heat_continuous run)
"""

import jax
import numpy as np

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import state as state_lib
from ihdm_jax import validation
from ihdm_jax import workdir as workdir_lib


class Model:
    """The EMA parameters of a run's newest checkpoint, with the run's config.

    f(u, k): the residual of the U-Net in inference mode, for NHWC float32 u and int32 k of
    shape (B,); pure and jit-able (it closes over the EMA parameters, which jit then embeds as
    constants: inside your own jit of a large model, use apply(params, u, k) with `params`
    passed as an argument). sample(key, num): Alg. 2 from the KDE prior over the training
    images, on a mesh of all devices, as --mode=sample draws. For a diffusion process
    (config.model.process, docs/processes.md) f is the ε-network with k = 1000·t (float32), and
    sample runs its ancestral sampler from N(0, V diag(c²) Vᵀ), as --mode=sample does.
    """

    def __init__(self, config, params, step: int, mesh):
        self.config = config
        self.params = params  # the EMA parameters, replicated over `mesh`
        self.step = step  # the checkpoint's training step
        self.mesh = mesh
        self.apply = programs.residual(state_lib.model_graphdef(config))
        self._f = jax.jit(self.apply)
        self._samplers = {}  # programs.Sampler by (sampler, steps, eta)
        self._source = None

    def f(self, u, k) -> jax.Array:
        """f(u, k) with the EMA parameters: float32 NHWC u, int32 k (B,) -> float32 like u."""
        return self._f(self.params, u, k)

    def sample(self, key, num: int, delta=None, sampler=None, steps=None, eta=None) -> np.ndarray:
        """num samples u_0 of the run's sampler (Alg. 2 for the paper's heat process) as float32
        numpy (num, H, W, C), not clipped (images lie in about [0, 1]).

        The chains start from the process's prior (for the heat process u_K = F(t_K) x + δ ε,
        x training images picked by config.seed) and run on a mesh of all devices in batches
        of config.sampling.batch_size (a multiple of the device count). δ, the sampler, its
        steps and DDIM's η are config.sampling's unless given. The samples depend only on `key`
        (a jax.random.key), num and the config, and with key =
        ihdm_jax.rng.sample_key(config.seed) they are those of --mode=sample before rounding.
        The training images are read at the first call (config.data must point at them).
        """
        config = self.config.copy_and_resolve_references()
        for name, value in (('sampler', sampler), ('steps', steps), ('eta', eta)):
            if value is not None:
                config.sampling[name] = value
        s = config.sampling
        chosen = (s.sampler, s.steps, s.eta)
        if chosen not in self._samplers:
            validation.check_config(config)
            parallel.check_divisible(s.batch_size, 'config.sampling.batch_size')
            if self._source is None:
                data.check(config)
                self._source = data.make_source(config)
            self._samplers[chosen] = programs.Sampler(config, self.mesh)
        return (
            self._samplers[chosen]
            .draw(self.params, self._source, num, key, delta=delta, uint8=False)
            .images
        )


def restore(config, workdir: str) -> Model:
    """The EMA parameters of the newest checkpoint in `workdir` for `config`, on a mesh of all
    devices (what every job that reads a trained model starts from)."""
    mesh = parallel.make_mesh()
    params, step = checkpoint.restore_ema_params(config, workdir, mesh)
    return Model(config, params, int(step), mesh)


def load(workdir: str) -> Model:
    """The run in `workdir`: its config.json and the EMA parameters of its newest checkpoint."""
    return restore(workdir_lib.read_config(workdir), workdir)
