"""Training (Alg. 1) and sampling (Alg. 2) jobs over a device mesh.

The training state is a plain pytree, replicated on every device; batches are split over the
'data' axis. The step is one jitted function with explicit shardings that donates the old state.
Randomness is a pure function of config.seed and the step, so a resumed run repeats exactly the
run it continues.
"""

import logging as std_logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import heat
from ihdm_jax import images
from ihdm_jax import objective
from ihdm_jax import parallel
from ihdm_jax import sampling
from ihdm_jax import validation
from ihdm_jax.models import unet

GIF_FRAMES = 41  # levels recorded for the trajectory GIF (evenly spaced from K to 0)
GIF_EXAMPLES = 16  # examples shown side by side in the GIF


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of updates applied so far
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate(config):
    """Linear warm-up from 0 to config.optim.lr over config.optim.warmup steps, then constant."""
    if config.optim.warmup > 0:
        return optax.linear_schedule(0.0, config.optim.lr, config.optim.warmup)
    return optax.constant_schedule(config.optim.lr)


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then Adam(0.9, 0.999, 1e-8) without weight decay."""
    return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                       optax.adam(learning_rate(config), b1=0.9, b2=0.999, eps=1e-8))


def ema_decay(ema_rate, step):
    """min(ema_rate, (1 + n) / (10 + n)) after n updates: a short memory early in training."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_rate, (1.0 + step) / (10.0 + step))


def model_graphdef(config):
    """The U-Net's static structure, built without allocating parameters."""
    model = nnx.eval_shape(lambda: unet.from_config(config, nnx.Rngs(0)))
    graphdef, _ = nnx.split(model, nnx.Param)
    return graphdef


def _init_fn(config, tx):
    def init(key):
        _, params = unet.init(config, key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))
    return init


def abstract_state(config, tx, mesh):
    """The TrainState as ShapeDtypeStructs, replicated over `mesh` (a restore target)."""
    shapes = jax.eval_shape(_init_fn(config, tx), jax.random.key(0))
    return checkpoint.abstract_like(shapes, jax.tree.map(lambda _: parallel.replicated(mesh),
                                                         shapes))


def init_state(config, tx, mesh, key) -> TrainState:
    """A fresh TrainState created directly on `mesh`, replicated; ema_params a separate copy."""
    return jax.jit(_init_fn(config, tx), out_shardings=parallel.replicated(mesh))(key)


def make_train_step(config, graphdef, tx, mesh):
    """The jitted step (state, batch, key) -> (state, metrics); the old state is donated.

    The step's randomness is fold_in(key, state.step): k, ε of Alg. 1 and the dropout masks.
    """
    t = heat.heat_times(config.model.K, config.model.blur_sigma_min, config.model.blur_sigma_max)
    schedule = learning_rate(config)

    def train_step(state, batch, key):
        key = jax.random.fold_in(key, state.step)
        loss_key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            def f(u, k):
                return unet.apply(graphdef, params, u, k, train=True, key=dropout_key)
            return objective.training_loss(f, batch, loss_key, t, config.model.sigma)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(config.model.ema_rate, state.step)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                  state.ema_params, params)
        grad_norm = optax.tree.norm(grads)
        metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
                   'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                               opt_state=opt_state)
        return new_state, metrics

    replicated = parallel.replicated(mesh)
    return jax.jit(train_step, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_sampler(config, graphdef, mesh, trajectory_steps=()):
    """The jitted (params, x, key) -> u_0 (, trajectory): prior draw from training images x, then
    Alg. 2 with the network at `params`. Batches and trajectories are split over 'data'."""
    K = config.model.K
    t_K = heat.heat_times(K, config.model.blur_sigma_min, config.model.blur_sigma_max)[-1]
    delta = config.sampling.delta

    def run(params, x, key):
        prior_key, chain_key = jax.random.split(key)
        u_K = sampling.prior_sample(prior_key, x, t_K, delta)

        def f(u, k):
            return unet.apply(graphdef, params, u, k, train=False)
        return sampling.sample(f, u_K, K, delta, chain_key, trajectory_steps)

    batch = parallel.batch_sharding(mesh)
    out = (batch, NamedSharding(mesh, P(None, parallel.DATA_AXIS))) if trajectory_steps else batch
    replicated = parallel.replicated(mesh)
    return jax.jit(run, in_shardings=(replicated, batch, replicated), out_shardings=out)


def draw_samples(config, sampler, params, loader, key, with_trajectory=False, progress=''):
    """config.sampling.num_samples images as uint8 NHWC, in chunks of config.sampling.batch_size.

    Chunk c starts from prior images `loader.prior_images(batch_size, c)` with key fold_in(key, c).
    Every process returns all samples. With a trajectory sampler, also returns the first chunk's
    trajectory as uint8 (levels, batch, H, W, C). A `progress` text shows a progress bar.
    """
    batch_size = config.sampling.batch_size
    chunks, trajectory = [], None
    for c in tqdm.trange(math.ceil(config.sampling.num_samples / batch_size), desc=progress,
                         unit='batch', disable=not progress or not parallel.is_main_process()):
        out = sampler(params, loader.prior_images(batch_size, c), jax.random.fold_in(key, c))
        if with_trajectory:
            out, traj = out
            if trajectory is None:
                trajectory = images.to_uint8(parallel.gather(traj))
        chunks.append(images.to_uint8(parallel.gather(out)))
    samples = np.concatenate(chunks)[:config.sampling.num_samples]
    return (samples, trajectory) if with_trajectory else samples


def _keys(config):
    """(initialisation key, training key, sampling key), all from config.seed."""
    return jax.random.split(jax.random.key(config.seed), 3)


class _OrbaxInfoFilter(std_logging.Filter):
    """Drops orbax's INFO records (a few dozen per checkpoint); its warnings and errors pass."""

    def filter(self, record):
        orbax = f'{os.sep}orbax{os.sep}' in record.pathname
        return record.levelno >= std_logging.WARNING or not orbax


def _quiet_orbax():
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OrbaxInfoFilter) for f in handler.filters):
        handler.addFilter(_OrbaxInfoFilter())


class _Logger:
    """absl log lines on every process; TensorBoard events, a progress bar and PNGs on process 0."""

    def __init__(self, workdir, start_step, n_iters):
        self.main = parallel.is_main_process()
        self.sample_dir = os.path.join(workdir, 'samples')
        self.writer = self.bar = None
        if self.main:
            from tensorboardX import SummaryWriter
            os.makedirs(self.sample_dir, exist_ok=True)
            self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
            # Redrawn every second on a terminal, every minute into a log file.
            self.bar = tqdm.tqdm(total=n_iters, initial=start_step, desc='train', unit='step',
                                 dynamic_ncols=True,
                                 mininterval=1 if sys.stderr.isatty() else 60)
        self.last_step, self.last_time = start_step, time.perf_counter()

    def advance(self):
        if self.bar is not None:
            self.bar.update()

    def _info(self, *args):
        if self.bar is not None:
            self.bar.clear()
        logging.info(*args)
        if self.bar is not None:
            self.bar.refresh()

    def metrics(self, step, collected):
        now = time.perf_counter()
        steps_per_s = (step - self.last_step) / (now - self.last_time)
        self.last_step, self.last_time = step, now
        collected = jax.device_get(collected)
        means = {name: float(np.mean([m[name] for m in collected])) for name in collected[0]
                 if name != 'finite'}
        means['steps_per_s'] = steps_per_s
        self._info('step %d: loss %.6f  grad_norm %.4f  lr %.3g  steps/s %.2f', step,
                   means['loss'], means['grad_norm'], means['lr'], steps_per_s)
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f'train/{name}', value, step)
            self.writer.flush()
            self.bar.set_postfix(loss=f'{means["loss"]:.4f}')

    def samples(self, step, samples):
        if not self.main:
            return
        path = os.path.join(self.sample_dir, f'step_{step:08d}.png')
        images.save_grid(path, samples)
        self.writer.add_image('samples', images.grid(samples), step, dataformats='HWC')
        self.writer.flush()
        self._info('step %d: EMA samples written to %s', step, path)

    def close(self):
        if self.main:
            self.bar.close()
            self.writer.close()


class NonFiniteLoss(validation.UserError):
    """The loss or the gradients of a step were NaN or infinite."""


class _StopRequest:
    """Whether the job has been asked to stop (SIGTERM, e.g. a preemption notice).

    With several processes, jax's preemption service catches SIGTERM and makes every process
    stop at the same step; a single process catches the signal itself.
    """

    def __init__(self, manager):
        self.manager = manager
        self.signalled = False
        self.previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def reached(self, step) -> bool:
        return self.signalled or self.manager.reached_preemption(step)

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _check_finite(unchecked, manager):
    """Raises NonFiniteLoss naming the first of the (step, metrics) pairs that is not finite."""
    values = jax.device_get([metrics for _, metrics in unchecked])
    for (step, _), metrics in zip(unchecked, values):
        if not metrics['finite']:
            raise NonFiniteLoss(
                f'The loss ({metrics["loss"]}) or the gradients (norm {metrics["grad_norm"]}) '
                f'are not finite at step {step}. Training stopped without saving; the newest '
                f'checkpoint (step {manager.latest_step()}) in {manager.directory} is unchanged. '
                'A lower config.optim.lr or config.optim.grad_clip may help.')
    unchecked.clear()


def train_and_evaluate(config, workdir: str):
    """Trains config's model in `workdir`, resuming from its newest checkpoint if there is one.

    Checkpoints every snapshot_freq steps, at the end, and when SIGTERM arrives (then it stops
    after the current step). The metrics are checked for NaN and infinity before anything is
    logged or saved, so a diverged state is never written.
    """
    _quiet_orbax()
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.sampling.batch_size, mesh, 'config.sampling.batch_size')
    checkpoint.save_config(config, workdir)
    loader = data.make_loader(config, parallel.batch_sharding(mesh))
    tx = make_optimizer(config)
    graphdef = model_graphdef(config)
    init_key, train_key, sample_key = _keys(config)

    manager = checkpoint.make_manager(workdir)
    stop = _StopRequest(manager)
    state = checkpoint.restore_latest(manager, abstract_state(config, tx, mesh))
    if state is None:
        state = init_state(config, tx, mesh, init_key)
    start_step = int(state.step)
    n_iters = config.training.n_iters
    logging.info('%s at step %d of %d on %d devices (%d processes); %d training images.',
                 'Resuming' if start_step else 'Starting', start_step, n_iters, mesh.size,
                 jax.process_count(), len(loader.source))

    train_step = make_train_step(config, graphdef, tx, mesh)
    sampler = make_sampler(config, graphdef, mesh)
    logger = _Logger(workdir, start_step, n_iters)
    collected, unchecked = [], []
    step = start_step
    batches = loader.batches(start_step)
    try:
        while step < n_iters:
            state, metrics = train_step(state, next(batches), train_key)
            step += 1
            collected.append(metrics)
            unchecked.append((step, metrics))
            logger.advance()
            stopping = stop.reached(step)
            log = step % config.training.log_freq == 0 or step == n_iters
            samples = step % config.training.sampling_freq == 0 or step == n_iters
            save = step % config.training.snapshot_freq == 0 or step == n_iters or stopping
            if log or samples or save:
                _check_finite(unchecked, manager)
            if log:
                logger.metrics(step, collected)
                collected = []
            if samples and not stopping:
                logger.samples(step, draw_samples(config, sampler, state.ema_params, loader,
                                                  sample_key))
            if save:
                checkpoint.save(manager, step, state)
            if stopping:
                logging.warning('Asked to stop (SIGTERM): checkpoint %d saved in %s. Run the '
                                'same command to resume.', step, manager.directory)
                break
    finally:
        batches.close()
        stop.close()
        manager.wait_until_finished()
        manager.close()
        logger.close()


def restore_ema_params(config, workdir: str, mesh):
    """(EMA parameters, step) of the newest checkpoint in `workdir`, replicated over `mesh`."""
    _quiet_orbax()
    tx = make_optimizer(config)
    manager = checkpoint.make_manager(workdir)
    state = checkpoint.restore_latest(manager, abstract_state(config, tx, mesh))
    manager.close()
    if state is None:
        raise validation.UserError(f'No checkpoint in {manager.directory}: train first '
                                   '(--mode=train).')
    return state.ema_params, int(state.step)


def sample_and_save(config, workdir: str):
    """EMA samples of the newest checkpoint: samples.npz, samples.png and trajectory.gif."""
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.sampling.batch_size, mesh, 'config.sampling.batch_size')
    ema_params, step = restore_ema_params(config, workdir, mesh)
    loader = data.make_loader(config, parallel.batch_sharding(mesh), config.sampling.batch_size)
    K = config.model.K
    levels = tuple(np.unique(np.linspace(0, K, min(K + 1, GIF_FRAMES)).round().astype(int))[::-1])
    sampler = make_sampler(config, model_graphdef(config), mesh, trajectory_steps=levels)
    sample_key = _keys(config)[2]
    samples, trajectory = draw_samples(config, sampler, ema_params, loader, sample_key,
                                       with_trajectory=True)
    if not parallel.is_main_process():
        return
    out_dir = os.path.join(workdir, 'samples')
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, 'samples.npz'), images=samples)
    images.save_grid(os.path.join(out_dir, 'samples.png'), samples)
    shown = trajectory[:, :GIF_EXAMPLES]
    images.save_gif(os.path.join(out_dir, 'trajectory.gif'),
                    [images.grid(frame) for frame in shown])
    logging.info('%d samples of checkpoint %d written to %s (samples.npz, samples.png, '
                 'trajectory.gif: levels %d..0).', len(samples), step, out_dir, K)
