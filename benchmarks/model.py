"""Training and sampling throughput of a config on the devices present, with MFU and memory.

  python -m benchmarks.model --config=configs/cifar10.py [--config.model.dtype=bfloat16]
      [--config.training.batch_size=128] [--config.sampling.batch_size=500]
      [--config.sampling.num_samples=10000] [--steps=10] [--repeats=5] [--json=cifar10.json]

Training: the step users run (programs.make_train_step on a mesh over all devices, the state donated
and threaded through), on a fixed random batch, so data loading is left out. The step time is
the median over `repeats` windows of `steps` steps, each ending with block_until_ready, after
compilation and one warm-up step. MFU is the compiled step's FLOPs (XLA cost analysis, per
device) / step time / the device's dense peak for config.model.dtype (measure.PEAK_TFLOPS, or
--peak_tflops).

Sampling: programs.Sampler.chains, the full K-level chain of Alg. 2 from random prior states,
compiled before timing; a window draws config.sampling.num_samples images in calls of
config.sampling.batch_size and copies each call's images to the host, as `--mode=sample` does.
"""

import functools
import json
import math
import types

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from benchmarks import measure
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import state as state_lib


def _random_images(shape, sharding, seed):
    """Uniform [0, 1) float32 images of a global `shape`, laid out on `sharding`."""
    host = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
    return jax.make_array_from_callback(shape, sharding, lambda index: host[index])


def benchmark_training(config, mesh, *, steps, repeats, peak_tflops=None):
    """Times the jitted training step; returns (figures, the state after the timed steps)."""
    if steps < 1 or repeats < 1:
        raise ValueError(f'steps and repeats must be >= 1, got {steps} and {repeats}.')
    batch_size = config.training.batch_size
    parallel.check_divisible(batch_size, 'config.training.batch_size', mesh.size)
    size, channels = config.data.image_size, config.data.num_channels
    batch = _random_images((batch_size, size, size, channels), parallel.batch_sharding(mesh), 0)
    train_key = rng.train_key(config.seed)
    state = state_lib.init_state(config, mesh, rng.init_key(config.seed))
    step = programs.make_train_step(config, state_lib.model_graphdef(config), mesh)

    lowered = step.lower(state, batch, train_key)
    compiled = lowered.compile()
    step_flops = measure.flops(compiled)
    if step_flops is None:
        logging.warning('XLA cost analysis of the compiled step gave no FLOP count: no MFU.')
    memory = compiled.memory_analysis()

    def window(n):
        nonlocal state
        for _ in range(n):
            state, metrics = compiled(state, batch, train_key)
        return state, metrics

    measure.median_seconds(lambda: window(1), 1)  # warm-up
    seconds = measure.median_seconds(lambda: window(steps), repeats) / steps

    device = mesh.devices.flat[0]
    peak = measure.peak_tflops(device, config.model.dtype, peak_tflops)
    achieved = None if step_flops is None else step_flops / seconds / 1e12
    lowered_flops = measure.flops(lowered)
    figures = dict(
        dtype=config.model.dtype,
        batch_size=batch_size,
        steps_per_window=steps,
        windows=repeats,
        step_ms=seconds * 1e3,
        images_per_s=batch_size / seconds,
        gflop_per_step_per_device=None if step_flops is None else step_flops / 1e9,
        # The program as written, all devices together, before XLA's optimisations: a check on
        # the count above (equal up to a few percent on one device).
        gflop_per_step_lowered=None if lowered_flops is None else lowered_flops / 1e9,
        tflops_per_s_per_device=achieved,
        peak_tflops=peak,
        mfu=None if peak is None or achieved is None else achieved / peak,
        # XLA's plan for the step: arguments (the state and batch) plus temporaries.
        compiled_argument_bytes=memory.argument_size_in_bytes if memory else None,
        compiled_temp_bytes=memory.temp_size_in_bytes if memory else None,
        peak_bytes_in_use=measure.peak_memory_bytes(device),
    )
    return figures, state


def benchmark_sampling(config, mesh, params, *, repeats):
    """Times config.sampling.num_samples images through the full K-level chain
    (programs.Sampler, as every job samples), from random prior states."""
    batch_size, num_samples = config.sampling.batch_size, config.sampling.num_samples
    parallel.check_divisible(batch_size, 'config.sampling.batch_size', mesh.size)
    size, channels = config.data.image_size, config.data.num_channels
    u_K = np.random.default_rng(1).uniform(size=(batch_size, size, size, channels))
    u_K = u_K.astype(np.float32)
    sampler = programs.Sampler(config, mesh)
    key = rng.sample_key(config.seed)
    calls = math.ceil(num_samples / batch_size)

    def window(n):
        return [
            sampler.chains(params, u_K, rng.example_keys(jax.random.fold_in(key, c), batch_size))
            for c in range(n)
        ]

    window(1)  # compilation
    seconds = measure.median_seconds(lambda: window(calls), repeats)
    return dict(
        K=config.model.K,
        batch_size=batch_size,
        num_samples=calls * batch_size,
        windows=repeats,
        wall_s=seconds,
        images_per_s=calls * batch_size / seconds,
        peak_bytes_in_use=measure.peak_memory_bytes(mesh.devices.flat[0]),
    )


def _num(x, spec):
    return 'n/a' if x is None else format(x, spec)


def _gib(n):
    if n is None:
        return 'n/a'
    return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def markdown(config_name, info, training, sampling):
    """The figures as markdown tables under a description of the device and the config."""
    lines = [
        measure.describe(info),
        f'{config_name}, compute dtype {training["dtype"]}',
        '',
        '| batch | step ms | train images/s | GFLOP/step/device | TFLOP/s/device | MFU '
        '| XLA args + temp | peak memory |',
        '|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    t = training
    mfu = 'n/a' if t['mfu'] is None else f'{100 * t["mfu"]:.1f}% of {t["peak_tflops"]:g}'
    lines.append(
        f'| {t["batch_size"]} | {t["step_ms"]:.1f} | {t["images_per_s"]:,.1f} '
        f'| {_num(t["gflop_per_step_per_device"], ",.1f")} '
        f'| {_num(t["tflops_per_s_per_device"], ".3f")} '
        f'| {mfu} | {_gib(t["compiled_argument_bytes"])} + '
        f'{_gib(t["compiled_temp_bytes"])} | {_gib(t["peak_bytes_in_use"])} |'
    )
    if sampling:
        s = sampling
        lines += [
            '',
            '| K | sample batch | samples | wall s | sample images/s | peak memory |',
            '|---:|---:|---:|---:|---:|---:|',
            f'| {s["K"]} | {s["batch_size"]} | {s["num_samples"]} | {s["wall_s"]:.2f} '
            f'| {s["images_per_s"]:,.2f} | {_gib(s["peak_bytes_in_use"])} |',
        ]
    return '\n'.join(lines)


def _define_flags():
    """The command line's flags, defined only when this module runs as a script (so that the
    tests can import it next to ihdm_jax.main, which defines --config too)."""
    f = types.SimpleNamespace(
        config=config_flags.DEFINE_config_file(
            'config', None, 'Path to a config file.', lock_config=True
        ),
        steps=flags.DEFINE_integer('steps', 10, 'Training steps per timed window.'),
        repeats=flags.DEFINE_integer(
            'repeats', 5, 'Timed training windows; the median is reported.'
        ),
        sample_repeats=flags.DEFINE_integer(
            'sample_repeats', 3, 'Timed sampling windows (0: no sampling); the median is reported.'
        ),
        peak=flags.DEFINE_float(
            'peak_tflops',
            None,
            'Peak TFLOP/s per device for MFU; default: the table in measure.py.',
        ),
        json=flags.DEFINE_string('json', None, 'Write the results as JSON here (a new file).'),
    )
    flags.mark_flags_as_required(['config'])
    return f


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = f.config.value
    parallel.use_cpu_cores([config.training.batch_size, config.sampling.batch_size])
    measure.check_new_file(f.json.value)
    info = measure.device_info()
    mesh = parallel.make_mesh()
    training, state = benchmark_training(
        config, mesh, steps=f.steps.value, repeats=f.repeats.value, peak_tflops=f.peak.value
    )
    sampling = None
    if f.sample_repeats.value > 0:
        sampling = benchmark_sampling(config, mesh, state.params, repeats=f.sample_repeats.value)
    if not parallel.is_main_process():
        return
    overrides = config_flags.get_override_values(flags.FLAGS['config'])
    config_name = ' '.join(
        [config_flags.get_config_filename(flags.FLAGS['config'])]
        + [f'{k}={v}' for k, v in sorted(overrides.items())]
    )
    print(markdown(config_name, info, training, sampling))
    if f.json.value:
        measure.write_json(
            f.json.value,
            dict(
                **info,
                command=measure.command(__spec__.name),
                config_name=config_name,
                config=json.loads(config.to_json_best_effort()),
                training=training,
                sampling=sampling,
            ),
        )


if __name__ == '__main__':
    app.run(functools.partial(main, f=_define_flags()))
