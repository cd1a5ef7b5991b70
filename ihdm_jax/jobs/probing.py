"""Probes of a trained model, one job (config, workdir) per --mode: input_gradients (Fig. 8),
trajectory_gradients (Fig. 8 right, 13b) and nearest_neighbours (App. D.4, Fig. 30), written
into <workdir>/analysis/<mode>/."""

import functools
import os

import jax
import numpy as np
import tqdm
from absl import logging

from ihdm_jax import data
from ihdm_jax import loading
from ihdm_jax import outputs
from ihdm_jax import parallel
from ihdm_jax import plots
from ihdm_jax import processes
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import schedule as schedule_lib
from ihdm_jax import state as state_lib
from ihdm_jax import storage
from ihdm_jax import validation
from ihdm_jax.analysis import probes


def check_input_gradients(config):
    validation.require_unconditional(config, 'input_gradients')
    schedule_lib.analysis_levels(config)
    fractions = [tuple(p) for p in config.analysis.gradient_pixels]
    validation.require(
        fractions and all(len(p) == 2 and all(0 <= v < 1 for v in p) for p in fractions),
        f'config.analysis.gradient_pixels={tuple(fractions)} must be (row, column) '
        'pairs of fractions of the image size in [0, 1).',
    )
    validation.require(
        config.analysis.gradient_linthresh > 0,
        f'config.analysis.gradient_linthresh={config.analysis.gradient_linthresh} must be > 0.',
    )


def check_trajectory_gradients(config):
    validation.require_unconditional(config, 'trajectory_gradients')
    schedule_lib.analysis_levels(config)
    validation.require(
        config.analysis.num_rows >= 1,
        f'config.analysis.num_rows={config.analysis.num_rows} must be at least 1.',
    )
    validation.require(
        config.analysis.gradient_linthresh > 0,
        f'config.analysis.gradient_linthresh={config.analysis.gradient_linthresh} must be > 0.',
    )


def check_nearest_neighbours(config):
    for name in ('num_rows', 'num_neighbours'):
        value = config.analysis[name]
        validation.require(value >= 1, f'config.analysis.{name}={value} must be at least 1.')
    parallel.check_divisible(config.sampling.batch_size, 'config.sampling.batch_size')


def input_gradients(config, workdir):
    """∂μ(u_k, k)[pixel]/∂u_k at u_k = F(t_k) x for a training image x (Sec. 4, Fig. 8); for
    a diffusion process at a draw of q(u_k | x) and its step mean (processes.py).

    For the output pixels of config.analysis.gradient_pixels (channel 0) and the levels of
    config.analysis.level_fractions: how the predicted mean at that pixel depends on every input
    pixel (of channel 0). Writes input_gradients.png (top row: the inputs u_k with the pixels
    marked; below, one row per pixel, symlog colours with linear range gradient_linthresh) and
    input_gradients.npz: gradients (pixels, levels, H, W, C), inputs, levels, pixels.
    """
    levels = schedule_lib.analysis_levels(config)
    size = config.data.image_size
    pixels = [(int(r * size), int(c * size)) for r, c in config.analysis.gradient_pixels]
    model = loading.restore(config, workdir)
    source = data.make_source(config)
    x = source.load(rng.prior_picks(config.seed, rng.ANALYSIS_DRAW, 1, len(source)))
    process = processes.from_config(config)
    gradient = _gradient_program(config, process)
    noise_key = rng.analysis_key(config.seed, rng.ANALYSIS_NOISE)
    inputs = np.stack(
        [
            np.asarray(
                process.level_state(
                    x.astype(np.float32) / 255.0, k, jax.random.fold_in(noise_key, k)
                )
            )[0]
            for k in levels
        ]
    )
    grads = np.stack(
        [
            [np.asarray(gradient(model.params, u[None], k, i, j)) for k, u in zip(levels, inputs)]
            for i, j in tqdm.tqdm(
                pixels, desc='input gradients', disable=not parallel.is_main_process()
            )
        ]
    )
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'input_gradients')
    storage.save_npz(
        os.path.join(out, 'input_gradients.npz'),
        gradients=grads,
        inputs=inputs,
        levels=np.array(levels),
        pixels=np.array(pixels),
    )
    plots.input_gradients(
        os.path.join(out, 'input_gradients.png'),
        grads[..., 0],
        np.asarray(process.to_image(inputs)),
        levels,
        pixels,
        [process.level_label(k) for k in levels],
        config.analysis.gradient_linthresh,
        model.step,
        config.model.process,
    )
    logging.info(
        'input_gradients: %d pixels x %d levels written to %s.', len(pixels), len(levels), out
    )


def _gradient_program(config, process):
    """(params, u (1, H, W, C), k, i, j) -> ∂μ(u, k)[0, i, j, 0]/∂u, (H, W, C); k, i, j traced."""
    f = programs.residual(state_lib.model_graphdef(config))

    @jax.jit
    def gradient(params, u, k, i, j):
        mu = lambda v: process.mean(functools.partial(f, params), v, k)  # noqa: E731
        return probes.input_gradient(mu, u, (i, j, 0))

    return gradient


def trajectory_gradients(config, workdir):
    """∂μ(u_k, k)[centre]/∂u_k along generated trajectories (Fig. 8 right, Fig. 13b).

    config.analysis.num_rows chains run from prior draws (config.sampling.delta, the noise keys
    of the other analyses); at each level k of config.analysis.level_fractions the chain's own
    state u_k, the input of the step at level k, is probed: how the predicted mean at the centre
    pixel (channel 0) depends on every input pixel. The paper shows a run with σ > 0 and one
    with σ = 0 sampled at δ = 0 (README.md). Writes trajectory_gradients.png (per chain a row
    of states u_k, level K first, and a row of their gradients, symlog colours with linear range
    gradient_linthresh) and trajectory_gradients.npz: gradients and states (chains, levels, H,
    W, C) float32, levels, pixel, u_K, noise_keys, delta, sigma.
    """
    levels = sorted(set(schedule_lib.analysis_levels(config)), reverse=True)
    rows, size = config.analysis.num_rows, config.data.image_size
    delta = config.sampling.delta
    pixel = (size // 2, size // 2)
    model = loading.restore(config, workdir)
    sampler = programs.Sampler(config, model.mesh)
    u_K = sampler.prior_states(
        data.make_source(config),
        rng.ANALYSIS_DRAW,
        rows,
        rng.analysis_key(config.seed, rng.ANALYSIS_PRIOR),
    )
    noise_keys = rng.example_keys(rng.analysis_key(config.seed, rng.ANALYSIS_NOISE), rows)
    states = sampler.chains(model.params, u_K, noise_keys, record=tuple(levels)).trajectory
    gradient = _gradient_program(config, sampler.process)
    grads = np.stack(
        [
            [np.asarray(gradient(model.params, u[None], k, *pixel)) for k, u in zip(levels, chain)]
            for chain in tqdm.tqdm(
                states, desc='trajectory gradients', disable=not parallel.is_main_process()
            )
        ]
    )
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'trajectory_gradients')
    storage.save_npz(
        os.path.join(out, 'trajectory_gradients.npz'),
        gradients=grads,
        states=states,
        levels=np.array(levels),
        pixel=np.array(pixel),
        u_K=u_K,
        noise_keys=noise_keys,
        delta=delta,
        sigma=config.model.sigma,
    )
    t = np.asarray(schedule_lib.from_config(config).t)
    plots.trajectory_gradients(
        os.path.join(out, 'trajectory_gradients.png'),
        grads[..., 0],
        states,
        levels,
        pixel,
        t,
        config.analysis.gradient_linthresh,
        model.step,
        config.model.sigma,
        delta,
    )
    logging.info(
        'trajectory_gradients: %d chains x %d levels written to %s.', rows, len(levels), out
    )


class _ScaledImages:
    """A source's images as float32 in [0, 1], loaded one slice at a time."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, rows):
        indices = np.arange(len(self.source))[rows]
        return self.source.load(indices).astype(np.float32) / 255.0


def nearest_neighbours(config, workdir):
    """Samples next to their Euclidean-nearest training images (App. D.4, Fig. 30).

    The samples are the first num_rows of --mode=sample's samples. Writes
    nearest_neighbours.png (one row per sample: the sample, then its neighbours, nearest first)
    and nearest_neighbours.npz: images, neighbours (uint8), indices, distances (root sum of
    squares over pixels in [0, 1]).
    """
    rows, num = config.analysis.num_rows, config.analysis.num_neighbours
    model = loading.restore(config, workdir)
    source = data.make_source(config)
    samples = (
        programs.Sampler(config, model.mesh)
        .draw(model.params, source, rows, rng.sample_key(config.seed))
        .images
    )
    if not parallel.is_main_process():
        return
    indices = probes.nearest_neighbours(
        samples / 255.0, _ScaledImages(source), num, chunk_size=1024
    )
    neighbours = source.load(indices.reshape(-1)).reshape((rows, num) + samples.shape[1:])
    distances = np.sqrt(
        np.sum(np.square(samples[:, None] / 255.0 - neighbours / 255.0), axis=(2, 3, 4))
    )
    out = outputs.folder(workdir, 'analysis', 'nearest_neighbours')
    storage.save_npz(
        os.path.join(out, 'nearest_neighbours.npz'),
        images=samples,
        neighbours=neighbours,
        indices=indices,
        distances=distances,
    )
    plots.save_table(
        os.path.join(out, 'nearest_neighbours.png'),
        np.concatenate([samples[:, None], neighbours], axis=1),
        f'Samples (checkpoint {model.step}) and their nearest training images',
        column_labels=['sample'] + [str(i + 1) for i in range(num)],
    )
    logging.info('nearest_neighbours: %d samples written to %s.', rows, out)
