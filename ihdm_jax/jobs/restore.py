"""--mode=restore: deblurring or super-resolution of the images of config.restore.input by the
trained heat model (docs/restoration.md). Writes <workdir>/restore/: restored.npz, the mean
restoration of each input as mean/<name>.png, grid.png (input | restorations | mean | reference)
and, with config.restore.reference, metrics.json (PSNR and SSIM)."""

import io
import os

import numpy as np
from absl import logging

from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import images
from ihdm_jax import loading
from ihdm_jax import outputs
from ihdm_jax import parallel
from ihdm_jax import plots
from ihdm_jax import programs
from ihdm_jax import restoration
from ihdm_jax import rng
from ihdm_jax import storage
from ihdm_jax.evaluation import quality

GRID_ROWS, GRID_RESTORATIONS = 16, 4  # inputs and restorations of each shown in grid.png


def read_images(location: str, channels: int, what: str) -> tuple:
    """(names, uint8 (N, h, w, C)) of an .npz with `images`, a folder of image files or one
    image file; errors.UserError for anything else."""
    if not storage.exists(location):
        raise errors.UserError(f'{what}={location!r} does not exist.')
    if location.endswith('.npz'):
        with np.load(io.BytesIO(storage.read_bytes(location))) as npz:
            if 'images' not in npz:
                raise errors.UserError(f'{what}={location!r} has no array `images`.')
            array = npz['images']
        if array.dtype != np.uint8 or array.ndim != 4:
            raise errors.UserError(
                f'{what}={location!r}: `images` is {array.dtype} of shape {array.shape}; '
                'expected uint8 (N, H, W, C).'
            )
        return [f'{i:05d}' for i in range(len(array))], array
    paths = data.image_files(location) if storage.isdir(location) else [location]
    if not paths:
        raise errors.UserError(f'{what}={location!r} is a folder without image files.')
    mode = 'L' if channels == 1 else 'RGB'
    pixels = []
    for path in paths:
        with data.open_image(path) as image:
            if image.mode not in (mode, 'P'):
                raise errors.UserError(
                    f'{path} is a {image.mode} image; the model takes {channels}-channel '
                    f'images ({mode}).'
                )
            array = np.asarray(image.convert(mode))
        pixels.append(array.reshape(array.shape[:2] + (channels,)))
    if len({p.shape for p in pixels}) > 1:
        raise errors.UserError(
            f'The images of {what}={location!r} differ in size: '
            f'{sorted({p.shape[:2] for p in pixels})}.'
        )
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return names, np.stack(pixels)


def degradation(config) -> restoration.Degradation:
    r = config.restore
    return restoration.Degradation(
        (config.data.image_size,) * 2, float(r.blur_sigma), int(r.upsample), float(r.noise)
    )


def check(config):
    r, channels = config.restore, config.data.num_channels
    if not r.input:
        raise errors.UserError(
            'config.restore.input is empty; expected the images to restore: a folder, an .npz '
            'with `images` or one image file.'
        )
    if r.num_samples < 1:
        raise errors.UserError(f'config.restore.num_samples={r.num_samples} must be at least 1.')
    parallel.check_divisible(config.sampling.batch_size, 'config.sampling.batch_size')
    names, y = read_images(r.input, channels, 'config.restore.input')
    d = degradation(config)
    d.check(y.shape, channels)
    programs.restoration_start(config, d)
    if r.reference:
        _, reference = read_images(r.reference, channels, 'config.restore.reference')
        expected = (len(names),) + d.size + (channels,)
        if reference.shape != expected:
            raise errors.UserError(
                f'config.restore.reference holds images of shape {reference.shape}; expected '
                f"{expected}, one for each input at the model's size."
            )


def restore(config, workdir: str):
    """config.restore.num_samples restorations of every input, by config.sampling's sampler."""
    r = config.restore
    model = loading.restore(config, workdir)
    names, y = read_images(r.input, config.data.num_channels, 'config.restore.input')
    d = degradation(config)
    out = model.restore(
        y,
        rng.sample_key(config.seed),
        d.blur_sigma,
        d.upsample,
        d.noise,
        r.num_samples,
        r.consistency,
    )
    if not parallel.is_main_process():
        return
    restored, mean = images.to_uint8(out), images.to_uint8(out.mean(axis=1))
    out_dir = outputs.folder(workdir, 'restore')
    storage.save_npz(
        storage.join(out_dir, 'restored.npz'), inputs=y, restorations=restored, mean=mean
    )
    mean_dir = outputs.folder(workdir, 'restore', 'mean')
    for name, image in zip(names, mean):
        images.save_grid(storage.join(mean_dir, f'{name}.png'), image[None])
    columns = [np.asarray(d.nearest(y / 255.0))]
    labels = ['input'] + [f'#{i + 1}' for i in range(min(r.num_samples, GRID_RESTORATIONS))]
    columns += [out[:, i] for i in range(len(labels) - 1)] + [out.mean(axis=1)]
    labels.append(f'mean of {r.num_samples}')
    metrics = {}
    if r.reference:
        _, reference = read_images(r.reference, config.data.num_channels, 'reference')
        x = reference / 255.0
        columns.append(x)
        labels.append('reference')
        for key, restorations in (('one', out[:, 0]), ('mean', out.mean(axis=1))):
            restorations = np.clip(restorations, 0.0, 1.0)
            metrics[key] = {
                'psnr': quality.psnr(restorations, x).tolist(),
                'ssim': quality.ssim(restorations, x).tolist(),
            }
        metrics['names'] = names
        outputs.write_json(storage.join(out_dir, 'metrics.json'), metrics)
    table = images.to_uint8(np.stack(columns, axis=1)[:GRID_ROWS])
    what = f'σ_y = {d.blur_sigma} px' if d.upsample == 1 else f'×{d.upsample}'
    plots.save_table(
        storage.join(out_dir, 'grid.png'),
        table,
        f'{"deblurring" if d.upsample == 1 else "super-resolution"} {what}, checkpoint '
        f'{model.step}',
        labels,
        names[:GRID_ROWS],
    )
    summary = ''.join(
        f'; {key}: PSNR {np.mean(m["psnr"]):.2f} dB, SSIM {np.mean(m["ssim"]):.4f}'
        for key, m in metrics.items()
        if key != 'names'
    )
    logging.info(
        '%d restorations of each of %d images written to %s%s.',
        r.num_samples,
        len(names),
        out_dir,
        summary,
    )
