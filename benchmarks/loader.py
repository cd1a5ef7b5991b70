"""Throughput of the training data loader on an image folder, against what the training step
consumes.

  python -m benchmarks.loader [--configs=afhq64,afhq256]
      [--num_files=256] [--source_size=512] [--steps=8] [--json=loader.json]

Writes `--num_files` JPEGs of `--source_size` px (smooth random pictures with noise, quality
90) into a temporary folder and reads them as `--mode=train` does: data.FolderSource (decode,
halve, resize, crop) and data.Loader's batches of (seed, step) on this process's devices, with
the loader's own pool of decoding threads. For each config it reports the loader's images/s
(the median over `--repeats` windows of `--steps` batches) while it decodes every image (the
first epoch) and once the images are in its memory cache (config.data.cache_mb; the later
epochs of a folder that fits), and the training step's appetite: the
step's FLOPs per image from XLA's cost analysis of the lowered step (the program as written, no
compilation), and the images/s one H100 would consume at `--mfu` of its dense bf16 peak, the
projection docs/benchmarks.md makes for CIFAR-10.
"""

import functools
import importlib
import os
import tempfile
import types

import jax
import numpy as np
from absl import app
from absl import flags
from PIL import Image

from benchmarks import measure
from ihdm_jax import data
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import state as state_lib

H100_BF16_TFLOPS = dict(measure.PEAK_TFLOPS)['H100']['bfloat16']


def write_jpegs(folder, count, size, seed=0):
    """`count` size x size RGB JPEGs: smooth random pictures (bicubic upsampling of 8x8 noise)
    with pixel noise, so that they compress about as photographs do."""
    generator = np.random.default_rng(seed)
    for i in range(count):
        coarse = Image.fromarray(generator.integers(0, 256, (8, 8, 3), np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(smooth + generator.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def loader_images_per_s(config, folder, steps, repeats, cached):
    """Median images/s of the training loader's batches (this process's rows): every image
    decoded (the first epoch), or, with `cached`, every image from the memory cache of
    config.data.cache_mb (the later epochs of a folder that fits)."""
    mesh = parallel.make_mesh()
    source = data.FolderSource(
        folder,
        config.data.image_size,
        config.data.num_channels,
        config.data.cache_mb if cached else 0,
    )
    if cached:
        source.load(np.arange(len(source)))
        assert len(source.cache) == len(source), 'raise config.data.cache_mb'
    loader = data.make_loader(config, source, parallel.batch_sharding(mesh))
    rows = len(loader.local_batch(0))  # also warms the thread pool up
    step = iter(range(1, 10**9))
    seconds = measure.median_seconds(
        lambda: [loader.local_batch(next(step)) for _ in range(steps)], repeats
    )
    return rows * steps / seconds, rows, len(source.skipped)


def step_gflop_per_image(config):
    """GFLOP per image of the training step as written (XLA's cost analysis of the lowered step
    on abstract arguments; nothing is compiled or allocated)."""
    mesh = parallel.make_mesh()
    batch = config.training.batch_size
    size, channels = config.data.image_size, config.data.num_channels
    images = jax.ShapeDtypeStruct(
        (batch, size, size, channels), np.float32, sharding=parallel.batch_sharding(mesh)
    )
    step = programs.make_train_step(config, state_lib.model_graphdef(config), mesh)
    lowered = step.lower(state_lib.abstract_state(config, mesh), images, rng.train_key(config.seed))
    return measure.flops(lowered) / batch / 1e9


def _define_flags():
    """The command line's flags, defined only when this module runs as a script (so that the
    tests can import it next to the other modules that define flags)."""
    return types.SimpleNamespace(
        configs=flags.DEFINE_list(
            'configs',
            ['afhq64', 'afhq256'],
            'Configs (modules of configs/) whose image size, batch and U-Net are measured.',
        ),
        num_files=flags.DEFINE_integer('num_files', 256, 'JPEG files in the folder.'),
        source_size=flags.DEFINE_integer('source_size', 512, 'Side of the JPEGs in pixels.'),
        steps=flags.DEFINE_integer('steps', 8, 'Batches per timed window.'),
        repeats=flags.DEFINE_integer('repeats', 3, 'Timed windows; the median is reported.'),
        mfu=flags.DEFINE_float(
            'mfu', 0.35, 'Fraction of the H100 bf16 peak the projection assumes.'
        ),
        json=flags.DEFINE_string('json', None, 'Write the results as JSON here (a new file).'),
    )


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    measure.check_new_file(f.json.value)
    info = measure.device_info()
    info['decoding_threads'] = min(16, os.cpu_count() or 1)  # data.FolderSource's pool
    rows = []
    with tempfile.TemporaryDirectory(prefix='ihdm-loader-') as folder:
        write_jpegs(folder, f.num_files.value, f.source_size.value)
        jpeg_kib = (
            sum(os.path.getsize(os.path.join(folder, file)) for file in os.listdir(folder))
            / f.num_files.value
            / 1024
        )
        for name in f.configs.value:
            config = importlib.import_module(f'configs.{name}').get_config()
            decoded, batch_rows, skipped = loader_images_per_s(
                config, folder, f.steps.value, f.repeats.value, cached=False
            )
            cached, _, _ = loader_images_per_s(
                config, folder, f.steps.value, f.repeats.value, cached=True
            )
            gflop = step_gflop_per_image(config)
            need = f.mfu.value * H100_BF16_TFLOPS * 1e3 / gflop
            cores = info.get('cpu_cores', 1)
            rows.append(
                dict(
                    config=name,
                    image_size=config.data.image_size,
                    batch_rows=batch_rows,
                    skipped_files=skipped,
                    decoded_images_per_s=decoded,
                    cached_images_per_s=cached,
                    decoded_images_per_s_per_core=decoded / cores,
                    step_gflop_per_image=gflop,
                    h100_images_per_s=need,
                    cores_per_h100_decoding=need / decoded * cores,
                )
            )
    print(measure.describe(info))
    print(
        f'{f.num_files.value} JPEGs of {f.source_size.value} px ({jpeg_kib:.0f} KiB each), '
        f'{info["decoding_threads"]} decoding threads; H100 need at {f.mfu.value:.0%} of '
        f'{H100_BF16_TFLOPS:.0f} TFLOP/s (bf16)\n'
    )
    print(
        '| config | px | decoded images/s | per core | cached images/s | step GFLOP / image '
        '| H100 needs images/s | cores per H100 while decoding |'
    )
    print('|---|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        print(
            f'| {r["config"]} | {r["image_size"]} | {r["decoded_images_per_s"]:,.0f} '
            f'| {r["decoded_images_per_s_per_core"]:,.0f} | {r["cached_images_per_s"]:,.0f} '
            f'| {r["step_gflop_per_image"]:,.1f} | {r["h100_images_per_s"]:,.0f} '
            f'| {r["cores_per_h100_decoding"]:.1f} |'
        )
    if f.json.value:
        measure.write_json(
            f.json.value,
            dict(**info, command=measure.command(__spec__.name), jpeg_kib=jpeg_kib, results=rows),
        )


if __name__ == '__main__':
    app.run(functools.partial(main, f=_define_flags()))
