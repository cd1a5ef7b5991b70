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

from ihdm_jax import conditioning
from ihdm_jax import errors
from ihdm_jax import images
from ihdm_jax import parallel
from ihdm_jax import processes
from ihdm_jax import restoration
from ihdm_jax import rng
from ihdm_jax import samplers
from ihdm_jax import sampling
from ihdm_jax import schedule as schedule_lib
from ihdm_jax import state as state_lib
from ihdm_jax.models import unet

GIF_FRAMES = 41  # grid points recorded for a trajectory GIF, evenly spaced from the prior to 0


def residual(graphdef):
    """f(params, u, k) of the U-Net in inference mode (no dropout); f(params, u, k, labels) of
    a conditional one."""

    def f(params, u, k, labels=None):
        return unet.apply(graphdef, params, u, k, train=False, labels=labels)

    return f


def sample_labels(config, num: int):
    """The labels (API labels: class indices, −1 for none) of `num` samples of a conditional
    model: config.sampling.labels (() = every class) repeated in turn, int32; None for an
    unconditional model."""
    if not config.model.num_classes:
        return None
    labels = tuple(config.sampling.labels) or tuple(range(config.model.num_classes))
    return np.resize(np.asarray(labels, np.int32), num)


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
    and the dropout masks; for a conditional model (batches of images and labels) also the
    label dropout (conditioning.drop_labels), from fold_in(that key, 1).
    """
    process = processes.from_config(config)
    tx = state_lib.make_optimizer(config)
    lr = state_lib.learning_rate(config)
    num_classes, label_dropout = config.model.num_classes, config.training.label_dropout

    def train_step(state, batch, key):
        key = jax.random.fold_in(key, state.step)
        loss_key, dropout_key = jax.random.split(key)
        labels = None
        if num_classes:
            batch, labels = batch
            labels = conditioning.drop_labels(
                jax.random.fold_in(key, 1), labels, label_dropout, num_classes
            )

        def loss_fn(params):
            def f(u, k):
                return unet.apply(
                    graphdef, params, u, k, train=True, key=dropout_key, labels=labels
                )

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

    def step(self, u, i, eps):
        """The sampler's step from grid point i to i − 1."""
        return self.method.step(self.f, u, i, self.delta, eps)


class Sampler:
    """The sampler of config.sampling.sampler for the process of config.model.process, with
    the network at given parameters, over the mesh: the sampling of every job.

    `prior_states` draws u_K from the process's prior (the KDE prior of Sec. 3.2 for the heat
    process), `chains` runs the reverse chain from given states with given noise keys, `draw`
    does both for many samples in chunks, and `run` maps any function of the bound chain over
    the mesh. δ is an argument of the compiled programs, so a sweep over δ compiles once.

    A conditional model (config.model.num_classes > 0) samples given labels (API labels:
    class indices, −1 for none; sample_labels): its chain's network is the guided one
    (conditioning.guided) at the guidance weight w (config.sampling.guidance unless given; an
    argument of the programs like δ), and the heat process's KDE prior picks training images
    of each sample's class (conditioning.class_picks).
    """

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.schedule = schedule_lib.from_config(config)
        self.process = process = processes.from_config(config)
        self.method = samplers.from_config(process, config)
        self.steps = self.method.steps
        self.num_classes = config.model.num_classes
        self._f = residual(state_lib.model_graphdef(config))
        self._programs, self._chain_fns, self._restore_fns = {}, {}, {}

        @jax.jit
        def prior(x, raw_keys, delta):
            def one(x_b, key_b):  # each example with its own key
                return process.prior(key_b, x_b[None], delta)[0]

            return jax.vmap(one)(x, jax.random.wrap_key_data(raw_keys))

        self._prior = prior
        # The grid points a trajectory GIF shows (trajectory_levels of the sampler's steps).
        self.gif_points = trajectory_levels(self.steps)

    def run(self, fn, params, *batched, delta=None, labels=None, guidance=None):
        """fn(chain, *batched) compiled on the mesh (on_mesh) for the bound Chain at `params`
        and δ (config.sampling.delta unless given), once per function object `fn`. Key data
        (rng.example_keys) pass as uint32 arrays: jax.random.wrap_key_data makes keys of them.
        A conditional model needs `labels` (B,), one per example of the batch, and guides its
        chain with weight `guidance` (config.sampling.guidance unless given)."""
        if (labels is None) != (not self.num_classes):
            raise ValueError('Labels go with a conditional model (config.model.num_classes).')
        if fn not in self._programs:

            def program(replicated, batched):
                params, delta, w = replicated
                f = functools.partial(self._f, params)
                if self.num_classes:
                    *batched, labels = batched
                    f = conditioning.guided(f, labels, self.num_classes, w)
                return fn(Chain(self.method, f, delta), *batched)

            self._programs[fn] = on_mesh(self.mesh, program)
        s = self.config.sampling
        delta = jnp.float32(s.delta if delta is None else delta)
        w = jnp.float32(s.guidance if guidance is None else guidance)
        if labels is not None:
            batched += (conditioning.network_labels(labels, self.num_classes),)
        return self._programs[fn]((params, delta, w), *batched)

    def prior_states(self, source, draw: int, n: int, key, delta=None, labels=None) -> np.ndarray:
        """n prior draws u_K, example b from fold_in(key, b): for the heat process
        F(t_K) x + δ ε of the KDE prior with the training images x of rng.prior_picks(seed,
        draw) (with labels (n,): of conditioning.class_picks, images of each label's class);
        for a diffusion process N(0, V diag(c²) Vᵀ). float32 numpy."""
        delta = self.schedule.delta if delta is None else delta
        if labels is None:
            picks = rng.prior_picks(self.config.seed, draw, n, len(source))
        else:
            generator = rng.numpy_rng(self.config.seed, rng.PRIOR, draw)
            picks = conditioning.class_picks(generator, np.asarray(labels), source.labels)
        x = source.load(picks).astype(np.float32) / 255.0
        return np.asarray(self._prior(x, rng.example_keys(key, n), jnp.float32(delta)))

    def chains(
        self, params, u_K, raw_keys, delta=None, record=(), labels=None, guidance=None
    ) -> Chains:
        """The chains from states u_K (B, H, W, C), chain b with the noise of raw_keys[b]
        (sampling.example_noise) and, for a conditional model, the label labels[b], as images
        in [0, 1] (not clipped), and the states at the grid points `record`."""
        record = tuple(int(i) for i in record)
        # One function object per record, so that run compiles each once.
        fn = self._chain_fns.setdefault(record, functools.partial(_chains, record))
        out = self.run(fn, params, u_K, raw_keys, delta=delta, labels=labels, guidance=guidance)
        return Chains(*out) if record else Chains(out, None)

    def restore(
        self, params, y, raw_keys, degradation, consistency: bool, progress=''
    ) -> np.ndarray:
        """Restorations of degraded images y (B, h, w, C) in [0, 1] made by `degradation`
        (restoration.Degradation), restoration b with the noise of raw_keys[b], as images
        (B, H, W, C), not clipped: the chain from the grid point of restoration_start to the
        data, with data consistency (restoration.consistency) after every step if asked. In
        whole chunks of config.sampling.batch_size (one compiled shape); `progress` as draw's.
        A conditional model restores given no class (the null class)."""
        key = (degradation, consistency)
        if key not in self._restore_fns:
            start, times = restoration_start(self.config, degradation)
            self._restore_fns[key] = functools.partial(
                restore_chains, degradation, consistency, start, times, self.schedule.sigma
            )
        batch_size, parts = self.config.sampling.batch_size, []
        labels = np.full(batch_size, -1, np.int32) if self.num_classes else None
        for c in tqdm.trange(
            math.ceil(len(y) / batch_size),
            desc=progress,
            unit='batch',
            disable=not progress or not parallel.is_main_process(),
        ):
            chunk = (np.asarray(a[c * batch_size : (c + 1) * batch_size]) for a in (y, raw_keys))
            y_c, keys_c = (
                np.concatenate([a, np.repeat(a[-1:], batch_size - len(a), 0)]) for a in chunk
            )
            out = self.run(self._restore_fns[key], params, y_c, keys_c, labels=labels)
            parts.append(np.asarray(out)[: min(batch_size, len(y) - c * batch_size)])
        return np.concatenate(parts)

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
        labels=None,
        guidance=None,
    ) -> Samples:
        """num_samples samples as uint8 NHWC (with uint8=False: float32 u_0 as the chain ends,
        not clipped), in chunks of config.sampling.batch_size.

        Every chunk is a whole batch (one compiled shape); the last is cut. Chunk c uses
        fold_in(key, c), split into the prior's key and the chains' key, and the training images
        of prior draw c. Every process returns all samples. With trajectory, also the first
        chunk's trajectory. A `progress` text shows a progress bar. A conditional model draws
        sample i given labels[i] (default: sample_labels of the config) at weight `guidance`.
        """
        if self.num_classes and labels is None:
            labels = sample_labels(self.config, num_samples)
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
            chunk_labels = None
            if labels is not None:  # the last chunk's rows past the end repeat its last label
                chunk_labels = np.asarray(labels)[
                    np.minimum(c * batch_size + np.arange(batch_size), num_samples - 1)
                ]
            u_K = self.prior_states(source, c, batch_size, prior_key, delta, chunk_labels)
            out = self.chains(
                params,
                u_K,
                rng.example_keys(chain_key, batch_size),
                delta,
                self.gif_points if trajectory and c == 0 else (),
                chunk_labels,
                guidance,
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


def restoration_start(config, degradation) -> tuple:
    """(i, t): the first point i of the sampler's grid from which to restore images made by
    `degradation` (restoration.start_index), and the heat times t of the grid points; one
    errors.UserError if the model cannot restore them."""
    process = processes.from_config(config)
    times = process.heat_times(samplers.from_config(process, config).grid)
    if times is None:
        raise errors.UserError(
            f'config.model.process={config.model.process!r} does not restore images: its states '
            'are not heat states F(t) x + σ ε.'
        )
    sigma, d = config.model.sigma, degradation
    if d.noise > sigma:
        raise errors.UserError(
            f'config.restore.noise={d.noise} exceeds the training noise σ = {sigma}: no state of '
            'the chain carries that much noise in its low frequencies.'
        )
    start = restoration.start_index(times, d.log_gain(), d.coefficient_noise(), sigma)
    if start is None:
        what = (
            f'config.restore.upsample={d.upsample}: the frequencies a low-resolution image lacks'
            if d.upsample > 1
            else f'config.restore.blur_sigma={d.blur_sigma}: the frequencies the blur removes'
        )
        raise errors.UserError(
            f'{what} are not blurred below σ = {sigma} at any level of the model '
            f'(σ_B,max = {config.model.blur_sigma_max}).'
        )
    return start, times


def restore_chains(degradation, consistency, start, times, sigma, chain, y, raw_keys):
    """Sampler.restore's program, for the bound chain (Chain) from grid point `start` with the
    grid's heat times `times` and training noise σ = sigma: restorations of y (B, h, w, C), the
    sampler's noise and the consistency's of example b from the two halves of raw_keys[b]."""
    keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(raw_keys))
    shape = degradation.size + (y.shape[-1],)
    noise = sampling.example_noise(keys[:, 0], shape)
    data_noise = sampling.example_noise(keys[:, 1], shape)
    times = jnp.asarray(times, jnp.float32)

    def project(u, i, eps):
        top_up = jnp.where(i > 0, sigma, 0.0)
        return degradation.consistency(u, times[i], y, sigma, top_up, eps)

    def step(u, i, eps):
        u = chain.step(u, i, eps[0])
        return project(u, i - 1, eps[1]) if consistency else u

    u = project(sigma * data_noise(start), start, data_noise(start))
    final, _ = sampling.chain(step, u, start, lambda i: (noise(i), data_noise(i - 1)))
    return chain.process.to_image(final)
