"""Compiled programs over the device mesh: the training step, the sampler and a map of any
function over the mesh, which every job that runs the network in batches goes through.

The training state is replicated and batches are split over the mesh's 'data' axis. Every
random number of a sample comes from its own key, so samples do not depend on the batch size,
the padding or the number of devices.
"""

import dataclasses
import functools
import math
from typing import Callable
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from ihdm_jax import images
from ihdm_jax import parallel
from ihdm_jax import processes
from ihdm_jax import rng
from ihdm_jax import samplers
from ihdm_jax import sampling
from ihdm_jax import schedule as schedule_lib
from ihdm_jax import state as state_lib
from ihdm_jax.models import unet

GIF_FRAMES = 41  # grid points recorded for a trajectory GIF, evenly spaced from the prior to 0


def residual(graphdef):
    """f(params, u, k) of the U-Net in inference mode (no dropout)."""

    def f(params, u, k):
        return unet.apply(graphdef, params, u, k, train=False)

    return f


def trajectory_levels(K: int) -> tuple:
    """The grid points a trajectory GIF shows: GIF_FRAMES points from K down to 0 (all if
    fewer)."""
    return tuple(
        int(k)
        for k in np.unique(np.linspace(0, K, min(K + 1, GIF_FRAMES)).round().astype(int))[::-1]
    )


def make_train_step(config, graphdef, mesh):
    """The jitted step (state, batch, key) -> (state, metrics); the old state is donated.

    The step's randomness is fold_in(key, state.step): k, ε of Alg. 1 (or the process's t, ε)
    and the dropout masks.
    """
    process = processes.from_config(config)
    tx = state_lib.make_optimizer(config)
    lr = state_lib.learning_rate(config)

    def train_step(state, batch, key):
        key = jax.random.fold_in(key, state.step)
        loss_key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            def f(u, k):
                return unet.apply(graphdef, params, u, k, train=True, key=dropout_key)

            return process.loss(f, batch, loss_key)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = state_lib.ema_decay(config.model.ema_rate, state.step)
        ema_params = jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
        )
        grad_norm = optax.tree.norm(grads)
        metrics = {
            'loss': loss,
            'grad_norm': grad_norm,
            'lr': lr(state.step),
            'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        return state_lib.TrainState(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        ), metrics

    replicated = parallel.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def on_mesh(mesh, fn):
    """fn(replicated, batched) jitted on `mesh`, as a function of numpy inputs and outputs.

    `replicated` (a pytree of arrays, the same on every process) goes whole to every device.
    The arrays of the tuple `batched` and every output are split over 'data' along their first
    axis; the batch is padded to a multiple of the device count (by repeating its last entry)
    and the outputs are cut back to it. Every process passes the whole batch and gets every
    output.
    """
    sharding, replicated_sharding = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    jitted = jax.jit(fn, in_shardings=(replicated_sharding, sharding), out_shardings=sharding)

    def replicate(x):
        if isinstance(x, jax.Array) and x.sharding == replicated_sharding:
            return x
        x = np.asarray(x)
        return parallel.to_global(x, replicated_sharding, x.shape)

    def to_mesh(x, size):
        x = np.asarray(x)
        x = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
        return parallel.to_global(x[parallel.local_rows(sharding, x.shape)], sharding, x.shape)

    def call(replicated, *batched):
        n = len(batched[0])
        size = -(-n // mesh.size) * mesh.size
        out = jitted(jax.tree.map(replicate, replicated), tuple(to_mesh(x, size) for x in batched))
        return jax.tree.map(lambda y: parallel.gather(y)[:n], out)

    return call


class Chains(NamedTuple):
    """Sampler.chains: u_0 of each chain (B, H, W, C), and the states at the recorded grid
    points (B, points, H, W, C), None where none were asked for."""

    final: np.ndarray
    trajectory: Optional[np.ndarray]


class Samples(NamedTuple):
    """Sampler.draw: the samples, and the first chunk's trajectory (B, points, H, W, C) where
    asked for (else None)."""

    images: np.ndarray
    trajectory: Optional[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Chain:
    """The sampler of a config with the network's parameters and δ bound, as a function inside
    a compiled program (Sampler.run): chain(u, noise, record=(), start=None, stop=0) runs
    samplers.Sampler.__call__; f is the network at the parameters."""

    method: samplers.Sampler
    f: Callable
    delta: jax.Array

    @property
    def process(self):
        return self.method.process

    def __call__(self, u, noise, record=(), start=None, stop=0):
        return self.method(self.f, u, self.delta, noise, record, start, stop)


class Sampler:
    """The sampler of config.sampling.sampler for the process of config.model.process, with
    the network at given parameters, over the mesh: the sampling of every job.

    `prior_states` draws u_K from the process's prior (the KDE prior of Sec. 3.2 for the heat
    process), `chains` runs the reverse chain from given states with given noise keys, `draw`
    does both for many samples in chunks, and `run` maps any function of the bound chain over
    the mesh. δ is an argument of the compiled programs, so a sweep over δ compiles once.
    """

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.schedule = schedule_lib.from_config(config)
        self.process = process = processes.from_config(config)
        self.method = samplers.from_config(process, config)
        self.steps = self.method.steps
        self._f = residual(state_lib.model_graphdef(config))
        self._programs, self._chain_fns = {}, {}

        @jax.jit
        def prior(x, raw_keys, delta):
            def one(x_b, key_b):  # each example with its own key
                return process.prior(key_b, x_b[None], delta)[0]

            return jax.vmap(one)(x, jax.random.wrap_key_data(raw_keys))

        self._prior = prior
        # The grid points a trajectory GIF shows (trajectory_levels of the sampler's steps).
        self.gif_points = trajectory_levels(self.steps)

    def run(self, fn, params, *batched, delta=None):
        """fn(chain, *batched) compiled on the mesh (on_mesh) for the bound Chain at `params`
        and δ (config.sampling.delta unless given), once per function object `fn`. Key data
        (rng.example_keys) pass as uint32 arrays: jax.random.wrap_key_data makes keys of them."""
        if fn not in self._programs:

            def program(replicated, batched):
                params, delta = replicated
                chain = Chain(self.method, functools.partial(self._f, params), delta)
                return fn(chain, *batched)

            self._programs[fn] = on_mesh(self.mesh, program)
        delta = jnp.float32(self.schedule.delta if delta is None else delta)
        return self._programs[fn]((params, delta), *batched)

    def prior_states(self, source, draw: int, n: int, key, delta=None) -> np.ndarray:
        """n prior draws u_K, example b from fold_in(key, b): for the heat process
        F(t_K) x + δ ε of the KDE prior with the training images x of rng.prior_picks(seed,
        draw); for a diffusion process N(0, V diag(c²) Vᵀ). float32 numpy."""
        delta = self.schedule.delta if delta is None else delta
        picks = rng.prior_picks(self.config.seed, draw, n, len(source))
        x = source.load(picks).astype(np.float32) / 255.0
        return np.asarray(self._prior(x, rng.example_keys(key, n), jnp.float32(delta)))

    def chains(self, params, u_K, raw_keys, delta=None, record=()) -> Chains:
        """The chains from states u_K (B, H, W, C), chain b with the noise of raw_keys[b]
        (sampling.example_noise), as images in [0, 1] (not clipped), and the states at the grid
        points `record`."""
        record = tuple(int(i) for i in record)
        # One function object per record, so that run compiles each once.
        fn = self._chain_fns.setdefault(record, functools.partial(_chains, record))
        out = self.run(fn, params, u_K, raw_keys, delta=delta)
        return Chains(*out) if record else Chains(out, None)

    def draw(
        self,
        params,
        source,
        num_samples: int,
        key,
        delta=None,
        trajectory=False,
        progress='',
        uint8=True,
    ) -> Samples:
        """num_samples samples as uint8 NHWC (with uint8=False: float32 u_0 as the chain ends,
        not clipped), in chunks of config.sampling.batch_size.

        Every chunk is a whole batch (one compiled shape); the last is cut. Chunk c uses
        fold_in(key, c), split into the prior's key and the chains' key, and the training images
        of prior draw c. Every process returns all samples. With trajectory, also the first
        chunk's trajectory. A `progress` text shows a progress bar.
        """
        batch_size = self.config.sampling.batch_size
        chunks, first_trajectory = [], None
        convert = images.to_uint8 if uint8 else np.asarray
        for c in tqdm.trange(
            math.ceil(num_samples / batch_size),
            desc=progress,
            unit='batch',
            disable=not progress or not parallel.is_main_process(),
        ):
            prior_key, chain_key = jax.random.split(jax.random.fold_in(key, c))
            u_K = self.prior_states(source, c, batch_size, prior_key, delta)
            out = self.chains(
                params,
                u_K,
                rng.example_keys(chain_key, batch_size),
                delta,
                self.gif_points if trajectory and c == 0 else (),
            )
            if out.trajectory is not None:
                first_trajectory = convert(out.trajectory)
            chunks.append(convert(out.final))
        return Samples(np.concatenate(chunks)[:num_samples], first_trajectory)


def _chains(record, chain, u_K, raw_keys):
    """Sampler.chains' program: the final images and, where `record` names grid points, the
    images there, example-major."""
    noise = sampling.example_noise(jax.random.wrap_key_data(raw_keys), u_K.shape[1:])
    final, states = chain(u_K, noise, record)
    to_image = chain.process.to_image
    if not record:
        return to_image(final)
    return to_image(final), to_image(jnp.swapaxes(states, 0, 1))
