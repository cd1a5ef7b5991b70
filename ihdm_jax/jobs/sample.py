"""--mode=sample: EMA samples of the newest checkpoint as samples.npz, samples.png and a GIF of
the reverse process (heat, or the diffusion process of config.model.process). A conditional
model draws the classes of config.sampling.labels in turn (() = every class) at guidance
config.sampling.guidance, and samples.npz holds each sample's label too."""

import os

from absl import logging

from ihdm_jax import data
from ihdm_jax import images
from ihdm_jax import loading
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import storage

GIF_EXAMPLES = 16  # examples shown side by side in the trajectory GIF


def check(config):
    parallel.check_divisible(config.sampling.batch_size, 'config.sampling.batch_size')


def sample(config, workdir: str):
    """config.sampling.num_samples samples into <workdir>/samples; the trajectory of the first
    GIF_EXAMPLES of them, from the prior to the data, as trajectory.gif."""
    model = loading.restore(config, workdir)
    source = data.make_source(config)
    sampler = programs.Sampler(config, model.mesh)
    labels = programs.sample_labels(config, config.sampling.num_samples)
    samples, trajectory = sampler.draw(
        model.params,
        source,
        config.sampling.num_samples,
        rng.sample_key(config.seed),
        trajectory=True,
        progress='samples',
        labels=labels,
    )
    data.report_skipped(source)
    if not parallel.is_main_process():
        return
    out_dir = os.path.join(workdir, 'samples')
    storage.makedirs(out_dir)
    storage.save_npz(
        os.path.join(out_dir, 'samples.npz'),
        images=samples,
        **({} if labels is None else {'labels': labels}),
    )
    images.save_grid(os.path.join(out_dir, 'samples.png'), samples)
    shown = trajectory[:GIF_EXAMPLES]
    images.save_gif(
        os.path.join(out_dir, 'trajectory.gif'),
        [images.grid(shown[:, i]) for i in range(shown.shape[1])],
    )
    logging.info(
        '%d samples of checkpoint %d written to %s (samples.npz, samples.png, '
        'trajectory.gif: %d steps of the %s sampler).',
        len(samples),
        model.step,
        out_dir,
        sampler.steps,
        config.sampling.sampler,
    )
