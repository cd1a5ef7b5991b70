"""Compiled programs over the device mesh: the training step, the sampler and a map of any
function over the mesh, which every job that runs the network in batches goes through.

The training state is replicated and batches are split over the mesh's 'data' axis. Every
random number of a sample comes from its own key, so samples do not depend on the batch size,
the padding or the number of devices.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from ihdm_jax import processes
from ihdm_jax import parallel
from ihdm_jax import rng
from ihdm_jax import sampling
from ihdm_jax import schedule as schedule_lib
from ihdm_jax import state as state_lib
from ihdm_jax.models import unet

GIF_FRAMES = 41  # levels recorded for a trajectory GIF, evenly spaced from K to 0


def residual(graphdef):
    """f(params, u, k) of the U-Net in inference mode (no dropout)."""
    def f(params, u, k):
        return unet.apply(graphdef, params, u, k, train=False)
    return f


def trajectory_levels(K: int) -> tuple:
    """The levels a trajectory GIF shows: GIF_FRAMES levels from K down to 0 (all if fewer)."""
    return tuple(int(k) for k in
                 np.unique(np.linspace(0, K, min(K + 1, GIF_FRAMES)).round().astype(int))[::-1])


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
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                  state.ema_params, params)
        grad_norm = optax.tree.norm(grads)
        metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': lr(state.step),
                   'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        return state_lib.TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                                    opt_state=opt_state), metrics

    replicated = parallel.replicated(mesh)
    return jax.jit(train_step, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def on_mesh(mesh, fn):
    """fn(replicated, batched) jitted on `mesh`, as a function of numpy inputs and outputs.

    `replicated` (a pytree of arrays, the same on every process) goes whole to every device. The arrays of the tuple `batched` and
    every output are split over 'data' along their first axis; the batch is padded to a multiple
    of the device count (by repeating its last entry) and the outputs are cut back to it. Every
    process passes the whole batch and gets every output.
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
        out = jitted(jax.tree.map(replicate, replicated),
                     tuple(to_mesh(x, size) for x in batched))
        return jax.tree.map(lambda y: parallel.gather(y)[:n], out)
    return call


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (values outside are clipped) as uint8."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


class Sampler:
    """Alg. 2 (or the ancestral sampler of a diffusion process, processes.py) with the network
    at given parameters, over the mesh; the sampling of every job.

    `prior_states` draws u_K from the prior (the KDE prior of Sec. 3.2 for the heat process),
    `chains` runs the reverse chain from given states with given noise keys, and `draw` does both
    for many samples in chunks. δ is an argument of the compiled chain, so a sweep over δ
    compiles once.
    """

    def __init__(self, config, mesh):
        self.config = config
        self.schedule = schedule_lib.from_config(config)
        self.process = process = processes.from_config(config)
        f = residual(state_lib.model_graphdef(config))
        self.K = K = process.chain_levels

        def run(levels, replicated, batched):
            params, delta = replicated
            u_K, raw_keys = batched
            noise = sampling.example_noise(jax.random.wrap_key_data(raw_keys), u_K.shape[1:])
            out = process.chain(functools.partial(f, params), u_K, delta, noise, levels)
            return (out[0], jnp.swapaxes(out[1], 0, 1)) if levels else out

        @jax.jit
        def prior(x, raw_keys, delta):
            def one(x_b, key_b):  # each example with its own key
                return process.prior(key_b, x_b[None], delta)[0]
            return jax.vmap(one)(x, jax.random.wrap_key_data(raw_keys))

        self._prior = prior
        self._programs = {levels: on_mesh(mesh, functools.partial(run, levels))
                          for levels in ((), trajectory_levels(K))}

    def prior_states(self, source, draw: int, n: int, key, delta=None) -> np.ndarray:
        """n prior draws u_K, example b from fold_in(key, b): for the heat process
        F(t_K) x + δ ε of the KDE prior with the training images x of rng.prior_picks(seed,
        draw); for a diffusion process N(0, V diag(c²) Vᵀ). float32 numpy."""
        delta = self.schedule.delta if delta is None else delta
        picks = rng.prior_picks(self.config.seed, draw, n, len(source))
        x = source.load(picks).astype(np.float32) / 255.0
        return np.asarray(self._prior(x, rng.example_keys(key, n), jnp.float32(delta)))

    def chains(self, params, u_K, raw_keys, delta=None, trajectory=False):
        """u_0 of the chains from states u_K (B, H, W, C), chain b with the noise of raw_keys[b]
        (example_noise). With trajectory, also the states at trajectory_levels(K), (B, levels,
        H, W, C)."""
        delta = jnp.float32(self.schedule.delta if delta is None else delta)
        program = self._programs[trajectory_levels(self.K) if trajectory else ()]
        return program((params, delta), u_K, raw_keys)

    def draw(self, params, source, num_samples: int, key, delta=None, trajectory=False,
             progress='', uint8=True):
        """num_samples samples as uint8 NHWC (with uint8=False: float32 u_0 as the chain ends,
        not clipped), in chunks of config.sampling.batch_size.

        Every chunk is a whole batch (one compiled shape); the last is cut. Chunk c uses
        fold_in(key, c), split into the prior's key and the chains' key, and the training images
        of prior draw c. Every process returns all samples. With trajectory, also the first
        chunk's trajectory (B, levels, H, W, C). A `progress` text shows a progress bar.
        """
        batch_size = self.config.sampling.batch_size
        chunks, first_trajectory = [], None
        convert = to_uint8 if uint8 else np.asarray
        for c in tqdm.trange(math.ceil(num_samples / batch_size), desc=progress, unit='batch',
                             disable=not progress or not parallel.is_main_process()):
            prior_key, chain_key = jax.random.split(jax.random.fold_in(key, c))
            u_K = self.prior_states(source, c, batch_size, prior_key, delta)
            out = self.chains(params, u_K, rng.example_keys(chain_key, batch_size), delta,
                              trajectory and c == 0)
            if trajectory and c == 0:
                out, first_trajectory = out[0], convert(out[1])
            chunks.append(convert(out))
        samples = np.concatenate(chunks)[:num_samples]
        return (samples, first_trajectory) if trajectory else samples
