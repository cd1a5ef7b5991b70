"""Probes of a trained model, one job (config, workdir) per --mode: input_gradients (Fig. 8) and
nearest_neighbours (App. D.4, Fig. 30), written into <workdir>/analysis/<mode>/."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import heat
from ihdm_jax import images
from ihdm_jax import outputs
from ihdm_jax import parallel
from ihdm_jax import plots
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import schedule as schedule_lib
from ihdm_jax import state as state_lib
from ihdm_jax import validation
from ihdm_jax.analysis import probes


def check_input_gradients(config):
    schedule_lib.analysis_levels(config)
    fractions = [tuple(p) for p in config.analysis.gradient_pixels]
    validation.require(fractions and all(len(p) == 2 and all(0 <= v < 1 for v in p)
                                         for p in fractions),
                       f'config.analysis.gradient_pixels={tuple(fractions)} must be (row, column) '
                       'pairs of fractions of the image size in [0, 1).')
    validation.require(config.analysis.gradient_linthresh > 0,
                       f'config.analysis.gradient_linthresh={config.analysis.gradient_linthresh} '
                       'must be > 0.')


def check_nearest_neighbours(config):
    for name in ('num_rows', 'num_neighbours'):
        value = config.analysis[name]
        validation.require(value >= 1, f'config.analysis.{name}={value} must be at least 1.')
    parallel.check_divisible(config.sampling.batch_size, 'config.sampling.batch_size')


def input_gradients(config, workdir):
    """∂μ(u_k, k)[pixel]/∂u_k at u_k = F(t_k) x for a training image x (Sec. 4, Fig. 8).

    For the output pixels of config.analysis.gradient_pixels (channel 0) and the levels of
    config.analysis.level_fractions: how the predicted mean at that pixel depends on every input
    pixel (of channel 0). Writes input_gradients.png (top row: the inputs u_k with the pixels
    marked; below, one row per pixel, symlog colours with linear range gradient_linthresh) and
    input_gradients.npz: gradients (pixels, levels, H, W, C), inputs, levels, pixels.
    """
    levels = schedule_lib.analysis_levels(config)
    size = config.data.image_size
    pixels = [(int(r * size), int(c * size)) for r, c in config.analysis.gradient_pixels]
    mesh = parallel.make_mesh()
    params, step = checkpoint.restore_ema_params(config, workdir, mesh)
    f = programs.residual(state_lib.model_graphdef(config))
    source = data.make_source(config)
    x = source.load(rng.prior_picks(config.seed, rng.ANALYSIS_DRAW, 1, len(source)))
    t = np.asarray(schedule_lib.from_config(config).t)

    @jax.jit
    def gradient(params, u, k, i, j):
        mu = lambda v: v + f(params, v, jnp.full((1,), k, jnp.int32))  # noqa: E731
        return probes.input_gradient(mu, u, (i, j, 0))

    inputs = np.stack([np.asarray(heat.heat_forward(x.astype(np.float32) / 255.0, t[k]))[0]
                       for k in levels])
    grads = np.stack([[np.asarray(gradient(params, u[None], k, i, j))
                       for k, u in zip(levels, inputs)] for i, j in tqdm.tqdm(
                           pixels, desc='input gradients', disable=not parallel.is_main_process())])
    if not parallel.is_main_process():
        return
    out = outputs.folder(workdir, 'analysis', 'input_gradients')
    np.savez(os.path.join(out, 'input_gradients.npz'), gradients=grads, inputs=inputs,
             levels=np.array(levels), pixels=np.array(pixels))
    plots.input_gradients(os.path.join(out, 'input_gradients.png'), grads[..., 0], inputs, levels,
                          pixels, t, config.analysis.gradient_linthresh, step)
    logging.info('input_gradients: %d pixels x %d levels written to %s.', len(pixels),
                 len(levels), out)


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
    mesh = parallel.make_mesh()
    params, step = checkpoint.restore_ema_params(config, workdir, mesh)
    source = data.make_source(config)
    samples = programs.Sampler(config, mesh).draw(params, source, rows,
                                                  rng.sample_key(config.seed))
    if not parallel.is_main_process():
        return
    indices = probes.nearest_neighbours(samples / 255.0, _ScaledImages(source), num,
                                        chunk_size=1024)
    neighbours = source.load(indices.reshape(-1)).reshape((rows, num) + samples.shape[1:])
    distances = np.sqrt(np.sum(np.square(samples[:, None] / 255.0 - neighbours / 255.0),
                               axis=(2, 3, 4)))
    out = outputs.folder(workdir, 'analysis', 'nearest_neighbours')
    np.savez(os.path.join(out, 'nearest_neighbours.npz'), images=samples, neighbours=neighbours,
             indices=indices, distances=distances)
    table = np.concatenate([samples[:, None], neighbours], axis=1)
    tile = samples.shape[1] * plots.tile_scale(samples.shape[1])
    xticks = list(zip(plots.tile_centres(num + 1, tile),
                      ['sample'] + [str(i + 1) for i in range(num)]))
    plots.save_canvas(os.path.join(out, 'nearest_neighbours.png'),
                      images.grid(table.reshape((-1,) + table.shape[2:]), num + 1),
                      f'Samples (checkpoint {step}) and their nearest training images', xticks)
    logging.info('nearest_neighbours: %d samples written to %s.', rows, out)
