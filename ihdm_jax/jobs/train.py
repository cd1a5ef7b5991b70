"""--mode=train: Alg. 1 over the device mesh, with checkpoints, logs and sample grids.

Randomness is a pure function of config.seed and the step, so a resumed run repeats exactly the
run it continues. SIGTERM and SIGINT (Ctrl-C) finish the current step, save and stop.
"""

import collections
import contextlib
import itertools
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
import tqdm
from absl import logging

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import images
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import state as state_lib
from ihdm_jax import storage
from ihdm_jax import workdir as workdir_lib


def check(config):
    parallel.check_divisible(config.training.batch_size, 'config.training.batch_size')
    parallel.check_divisible(config.sampling.batch_size, 'config.sampling.batch_size')


class _Phases:
    """Wall time spent outside the training steps, by phase (compilation, sampling, checkpoint),
    so that steps/s and the ETA count the training steps (input pipeline included) alone."""

    def __init__(self):
        self.seconds = collections.Counter()

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def total(self) -> float:
        return sum(self.seconds.values())


def _duration(seconds) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'


class _Logger:
    """absl log lines on every process; TensorBoard events, PNGs and, on a terminal, a progress
    bar on process 0. Without a terminal (a SLURM log, a redirected stderr) the log lines every
    log_freq steps are the progress: steps/s and the ETA of the training steps."""

    def __init__(self, workdir, start_step, n_iters, phases):
        self.main = parallel.is_main_process()
        self.workdir = workdir
        self.sample_dir = os.path.join(workdir, 'samples')
        self.n_iters, self.phases = n_iters, phases
        self.writer = self.bar = None
        if self.main:
            storage.makedirs(self.sample_dir)
            # TensorBoard hides the events at steps > start_step that a previous launch logged
            # after its last checkpoint: this run logs those steps again.
            self.writer = storage.summary_writer(
                os.path.join(workdir, 'tensorboard'), purge_step=start_step + 1
            )
        self.start_step = start_step
        self.started = time.perf_counter()
        self.mark(start_step)

    def mark(self, step):
        """Starts the interval of training steps that the next `metrics` measures."""
        self.last_step, self.last_time, self.last_other = (
            step,
            time.perf_counter(),
            self.phases.total(),
        )

    def start_bar(self):
        if self.main and sys.stderr.isatty():
            self.bar = tqdm.tqdm(
                total=self.n_iters,
                initial=self.last_step,
                desc='train',
                unit='step',
                dynamic_ncols=True,
            )

    def resume_bar(self):
        """Leaves the time of the phase that just ended out of the bar's rate and ETA."""
        if self.bar is not None:
            self.bar.unpause()

    def advance(self):
        if self.bar is not None:
            self.bar.update()

    def info(self, *args):
        if self.bar is not None:
            self.bar.clear()
        logging.info(*args)
        if self.bar is not None:
            self.bar.refresh()

    def metrics(self, step, collected):
        now, other = time.perf_counter(), self.phases.total()
        seconds = (now - self.last_time) - (other - self.last_other)
        steps_per_s = (step - self.last_step) / seconds
        self.mark(step)
        collected = jax.device_get(collected)
        means = {
            name: float(np.mean([m[name] for m in collected]))
            for name in collected[0]
            if name != 'finite'
        }
        means['steps_per_s'] = steps_per_s
        self.info(
            'step %d: loss %.6f  grad_norm %.4f  lr %.3g  steps/s %.2f  ETA %s',
            step,
            means['loss'],
            means['grad_norm'],
            means['lr'],
            steps_per_s,
            _duration((self.n_iters - step) / steps_per_s),
        )
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f'train/{name}', value, step)
            self.writer.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{means["loss"]:.4f}')

    def samples(self, step, samples_fn):
        with self.phases('sampling'):
            start = time.perf_counter()
            samples = samples_fn()
            if self.main:
                path = os.path.join(self.sample_dir, f'step_{step:08d}.png')
                images.save_grid(path, samples)
                self.writer.add_image('samples', images.grid(samples), step, dataformats='HWC')
                self.writer.flush()
                self.info(
                    'step %d: EMA samples written to %s (sampling: %.1f s)',
                    step,
                    path,
                    time.perf_counter() - start,
                )
        self.resume_bar()

    def summary(self, step, checkpoints):
        """The run's time by phase, and where its outputs are."""
        seconds = self.phases.seconds
        total = time.perf_counter() - self.started
        training = total - self.phases.total()
        trained = step - self.start_step
        rate = f' ({trained / training:.2f} steps/s)' if trained and training > 0 else ''
        logging.info(
            'Steps %d to %d in %s: training steps %.1f s%s, compilation %.1f s, '
            'sampling %.1f s, checkpoints %.1f s.',
            self.start_step,
            step,
            _duration(total),
            training,
            rate,
            seconds['compilation'],
            seconds['sampling'],
            seconds['checkpoint'],
        )
        workdir = self.workdir if storage.is_remote(self.workdir) else os.path.abspath(self.workdir)
        logging.info(
            'Outputs in %s: checkpoints/ (steps %s), samples/ (sample grids), '
            'tensorboard/ (tensorboard --logdir %s).',
            workdir,
            checkpoints,
            os.path.join(workdir, 'tensorboard'),
        )

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.bar = self.writer = None


class _StopRequest:
    """Whether the job has been asked to stop: SIGTERM (e.g. a preemption notice) or SIGINT.

    With several processes, jax's preemption service catches SIGTERM and makes every process
    stop at the same step; a single process catches the signals itself.
    """

    def __init__(self, manager):
        self.manager = manager
        self.signal = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            signals = (
                (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
            )
            self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def reached(self, step) -> bool:
        if self.manager.reached_preemption(step) and self.signal is None:
            self.signal = 'SIGTERM'
        return self.signal is not None

    def close(self):
        for s, previous in self.previous.items():
            signal.signal(s, previous)


def _check_finite(unchecked, manager):
    """Raises errors.Diverged naming the first of the (step, metrics) pairs that is not finite."""
    values = jax.device_get([metrics for _, metrics in unchecked])
    for (step, _), metrics in zip(unchecked, values):
        if not metrics['finite']:
            raise errors.Diverged(
                f'The loss ({metrics["loss"]}) or the gradients (norm {metrics["grad_norm"]}) '
                f'are not finite at step {step}. Training stopped without saving; '
                + (
                    f'no checkpoint was written in {manager.directory}. '
                    if manager.latest_step() is None
                    else f'the newest checkpoint (step {manager.latest_step()}) in '
                    f'{manager.directory} is unchanged. '
                )
                + 'A lower config.optim.lr or config.optim.grad_clip may help.'
            )
    unchecked.clear()


def train(config, workdir: str):
    """Trains config's model in `workdir`, resuming from its newest checkpoint if there is one.

    Checkpoints every snapshot_freq steps, at the end, and when asked to stop (SIGTERM, SIGINT;
    then it stops after the current step). The metrics are checked for NaN and infinity before
    anything is logged or saved, so a diverged state is never written. The caller holds the
    workdir's lock (ihdm_jax.lock; main.run takes it).
    """
    mesh = parallel.make_mesh()
    source = data.make_source(config)
    loader = data.make_loader(config, source, parallel.batch_sharding(mesh))
    workdir_lib.save_config(config, workdir)
    graphdef = state_lib.model_graphdef(config)

    manager = checkpoint.make_manager(
        workdir, config.training.max_to_keep, config.training.keep_period, remove_unfinished=True
    )
    saver = checkpoint.Saver(manager)
    stop = _StopRequest(manager)
    state = checkpoint.restore_latest(manager, state_lib.abstract_state(config, mesh))
    if state is None:
        state = state_lib.init_state(config, mesh, rng.init_key(config.seed))
    start_step = int(state.step)
    n_iters = config.training.n_iters
    logging.info(
        '%s at step %d of %d on %d devices (%d processes); %d training images.',
        'Resuming' if start_step else 'Starting',
        start_step,
        n_iters,
        mesh.size,
        jax.process_count(),
        len(source),
    )

    train_step = programs.make_train_step(config, graphdef, mesh)
    sampler = programs.Sampler(config, mesh)
    train_key, sample_key = rng.train_key(config.seed), rng.sample_key(config.seed)
    phases = _Phases()
    logger = _Logger(workdir, start_step, n_iters, phases)
    collected, unchecked = [], []
    step = start_step
    batches = loader.batches(start_step)
    try:
        if step < n_iters:
            first = next(batches)
            with phases('compilation'):
                train_step = train_step.lower(state, first, train_key).compile()
            logger.info('Compiled the training step in %.1f s.', phases.seconds['compilation'])
            logger.start_bar()
            inputs = itertools.chain([first], batches)
        while step < n_iters:
            state, metrics = train_step(state, next(inputs), train_key)
            step += 1
            collected.append(metrics)
            unchecked.append((step, metrics))
            logger.advance()
            saver.check()
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
                logger.samples(
                    step,
                    lambda: (
                        sampler.draw(
                            state.ema_params, source, config.sampling.num_samples, sample_key
                        ).images
                    ),
                )
            if save:
                with phases('checkpoint'):
                    saver.save(step, state)
                logger.resume_bar()
            if stopping:
                with phases('checkpoint'):
                    saver.check(wait=True)
                logging.warning(
                    'Asked to stop (%s): checkpoint %d saved in %s. Run the same '
                    'command to resume.',
                    stop.signal,
                    step,
                    manager.directory,
                )
                break
        with phases('checkpoint'):
            saver.check(wait=True)
        logger.close()
        logger.summary(step, list(manager.all_steps()))
    finally:
        batches.close()
        stop.close()
        logger.close()
        saver.close()
        data.report_skipped(source)
