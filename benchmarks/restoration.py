"""Restoration quality on held-out images: the model's restorations against classical baselines.

  python -m benchmarks.restoration --workdir=runs/digits [--num_samples=8] [--out=DIR]

The test split of the workdir's data (the 297 held-out digits for configs/digits.py) is degraded
on purpose: a Gaussian blur of σ_y = 1 and 2 px (the heat equation's F(σ_y²/2)) and the block
mean of 2 x 2 and 4 x 4 pixels, each rounded to 8 bits. For each, a table of PSNR (dB), SSIM,
high-frequency energy (ihdm_jax.evaluation.quality; as a ratio to the clean images') and time
of: the input as it is (nearest-upsampled for super-resolution), bicubic upsampling, DCT
zero-padding, Tikhonov deconvolution in the DCT basis (its α chosen on the training images),
and the model (ihdm_jax.load(workdir).restore): one restoration, the mean of --num_samples, the
spread between them (RMS over pixels of their standard deviation), and deblurring without data
consistency. Prints the tables; with --out writes restoration.json, restoration.md and a picture
per degradation, restoration_<name>.png (rows: examples; columns: input, the best baseline,
three restorations, their mean, the clean image).
"""

import functools
import json
import os
import time
import types

import jax
import numpy as np
from absl import app
from absl import flags
from PIL import Image

from ihdm_jax import data
from ihdm_jax import heat
from ihdm_jax import images
from ihdm_jax import loading
from ihdm_jax import plots
from ihdm_jax import restoration
from ihdm_jax import storage
from ihdm_jax.evaluation import quality

DEGRADATIONS = {
    'blur_1': {'blur_sigma': 1.0},
    'blur_2': {'blur_sigma': 2.0},
    'up_2': {'upsample': 2},
    'up_4': {'upsample': 4},
}
ALPHAS = np.logspace(-8, 0, 33)  # Tikhonov's α, chosen on the training images
SHOWN = 8  # examples in each picture (at most)


def _define_flags():
    """The command line's flags, defined only when this module runs as a script."""
    return types.SimpleNamespace(
        workdir=flags.DEFINE_string('workdir', None, 'The trained workdir (a heat process).'),
        num=flags.DEFINE_integer('num_samples', 8, 'Restorations of each image.'),
        out=flags.DEFINE_string('out', None, 'Folder for the tables and pictures.'),
    )


def degraded(degradation, x) -> np.ndarray:
    """The degradation of images x in [0, 1], rounded to 8 bits, as floats in [0, 1]."""
    y = np.asarray(degradation.apply(x))
    return np.round(np.clip(y, 0.0, 1.0) * 255) / 255


def bicubic(y, factor: int) -> np.ndarray:
    """PIL's bicubic upsampling of each channel of y (N, h, w, C) by `factor`."""
    _, h, w, _ = y.shape
    size = (w * factor, h * factor)
    return np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        Image.fromarray(c.astype(np.float32), 'F').resize(size, Image.BICUBIC)
                    )
                    for c in np.moveaxis(image, -1, 0)
                ],
                axis=-1,
            )
            for image in y
        ]
    )


def tikhonov_alpha(degradation, x_train) -> float:
    """The α of restoration.tikhonov with the best mean PSNR on the training images."""
    y = degraded(degradation, x_train)
    coefficients, log_gain = degradation.coefficients(y), degradation.log_gain()
    scores = [
        quality.psnr(np.clip(restoration.tikhonov(coefficients, log_gain, a), 0, 1), x_train).mean()
        for a in ALPHAS
    ]
    return float(ALPHAS[int(np.argmax(scores))])


def scores(restored, x, seconds=None) -> dict:
    restored = np.clip(restored, 0.0, 1.0)
    row = {
        'psnr': float(quality.psnr(restored, x).mean()),
        'ssim': float(quality.ssim(restored, x).mean()),
        'hf_energy_ratio': float(
            quality.high_frequency_energy(restored).mean() / quality.high_frequency_energy(x).mean()
        ),
    }
    if seconds is not None:
        row['seconds'] = seconds
    return row


def run(model, x, x_train, name, settings, num_samples):
    """The rows of one degradation, and the picture's columns."""
    size = (model.config.data.image_size,) * 2
    degradation = restoration.Degradation(size, **settings)
    y = degraded(degradation, x)
    factor = degradation.upsample
    rows, columns = {}, {}
    start = time.perf_counter()
    shown_input = degradation.nearest(y) if factor > 1 else y
    rows['input'] = scores(np.asarray(shown_input), x)
    columns['input'] = np.asarray(shown_input)
    if factor > 1:
        rows['bicubic'] = scores(bicubic(y, factor), x)
        rows['dct_zero_padding'] = scores(np.asarray(heat.idct_2d(restoration.place(y, factor))), x)
    alpha = tikhonov_alpha(degradation, x_train)
    best = np.asarray(
        restoration.tikhonov(degradation.coefficients(y), degradation.log_gain(), alpha)
    )
    rows[f'tikhonov (α = {alpha:.1e})'] = scores(best, x)
    columns['baseline'] = best
    key = jax.random.key(0)
    model.restore(y[:1], key, num_samples=1, **settings)  # compile
    for consistency in (True, False) if factor == 1 else (True,):
        start = time.perf_counter()
        out = model.restore(y, key, num_samples=num_samples, consistency=consistency, **settings)
        seconds = time.perf_counter() - start
        suffix = '' if consistency else ', no consistency'
        rows[f'model, one{suffix}'] = scores(out[:, 0], x, seconds / (len(x) * num_samples))
        rows[f'model, mean of {num_samples}{suffix}'] = scores(out.mean(axis=1), x)
        rows[f'model, mean of {num_samples}{suffix}']['spread'] = float(
            np.sqrt(np.mean(np.var(np.clip(out, 0, 1), axis=1)))
        )
        if consistency:
            columns['restorations'] = out[:, :3]
            columns['mean'] = out.mean(axis=1)
    columns['clean'] = x
    return rows, columns


def picture(columns, path, title, num_samples):
    """Rows of SHOWN examples: input, baseline, three restorations, their mean, clean."""
    table = np.concatenate(
        [
            columns['input'][:SHOWN, None],
            columns['baseline'][:SHOWN, None],
            columns['restorations'][:SHOWN],
            columns['mean'][:SHOWN, None],
            columns['clean'][:SHOWN, None],
        ],
        axis=1,
    )
    restorations = [f'#{i + 1}' for i in range(columns['restorations'].shape[1])]
    labels = ['input', 'Tikhonov', *restorations, f'mean of {num_samples}', 'clean']
    plots.save_table(path, images.to_uint8(table), title, labels)


def markdown(results) -> str:
    lines = []
    for name, rows in results.items():
        lines += [
            f'**{name}** ({results[name]["_settings"]})',
            '',
            '| method | PSNR (dB) | SSIM | HF energy ÷ clean | spread | ms per restoration |',
            '|---|---:|---:|---:|---:|---:|',
        ]
        for method, row in rows.items():
            if method.startswith('_'):
                continue
            spread = f'{row["spread"]:.4f}' if 'spread' in row else ''
            ms = f'{1000 * row["seconds"]:.1f}' if 'seconds' in row else ''
            lines.append(
                f'| {method} | {row["psnr"]:.2f} | {row["ssim"]:.4f} | '
                f'{row["hf_energy_ratio"]:.2f} | {spread} | {ms} |'
            )
        lines.append('')
    return '\n'.join(lines)


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    model = loading.load(f.workdir.value)
    config = model.config

    def load(split):
        source = data.make_source(config, split)
        return source.load(np.arange(len(source))).astype(np.float32) / 255.0

    x, x_train = load('test'), load('train')
    results = {}
    for name, settings in DEGRADATIONS.items():
        rows, columns = run(model, x, x_train, name, settings, f.num.value)
        rows['_settings'] = ', '.join(f'{k}={v}' for k, v in settings.items())
        results[name] = rows
        print(markdown({name: rows}), flush=True)
        if f.out.value:
            storage.makedirs(f.out.value)
            picture(
                columns,
                os.path.join(f.out.value, f'restoration_{name}.png'),
                f'{name}: {rows["_settings"]}',
                f.num.value,
            )
    if f.out.value:
        storage.write_text(
            os.path.join(f.out.value, 'restoration.json'), json.dumps(results, indent=2) + '\n'
        )
        storage.write_text(os.path.join(f.out.value, 'restoration.md'), markdown(results))


if __name__ == '__main__':
    app.run(functools.partial(main, f=_define_flags()))
