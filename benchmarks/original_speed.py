"""The rows of benchmarks/speed.py timed on the original PyTorch code, on this machine.

  python -m benchmarks.original_speed --original=PATH
      [--rows=small,small_nodropout,cifar10,chain,heat] [--repeats=5] [--threads=N]
      [--json=original_speed.json]

PATH is a checkout of github.com/AaltoML/generative-inverse-heat-dissipation. Its own code is
imported from there (model_code/, scripts/losses.py, scripts/sampling.py; its DCT is its own
model_code/torch_dct.py), so that the column "original PyTorch code" of the table in
docs/benchmarks.md can be measured beside `python -m benchmarks.speed` on one machine. It needs
torch and ml_collections only.

Each row is speed.py's: its flags, sizes (speed.small_config, speed.cifar10_config) and timing.
- training rows: the step of the original's train.py, losses.get_step_fn(train=True): its loss
  (the squared error summed over pixels, mean over the batch), Adam (losses.get_optimizer),
  learning-rate warm-up and gradient clipping (losses.optimization_manager) and EMA
  (model_code/ema.py), on mutils.create_model's U-Net and a fixed random batch. The config is the
  original's default for the data (configs/mnist or configs/cifar10) with speed.py's sizes. Step
  time: the median over --repeats windows of 5 steps, after one warm-up step.
- chain: sampling.get_sampling_fn_inverse_heat as train.py samples (the model in eval mode),
  from a random u_K, δ = config.sampling.delta; the median of max(1, repeats // 2) chains after one.
- heat: the original's DCTBlur (model_code/utils.py, its forward process) on 64 RGB images at
  the levels t of speed.time_heat; its σ are float64 (from numpy, as in training), and so is
  its arithmetic after the DCT.
torch runs --threads threads, by default the CPUs this process may use. CIFAR-10's original config
trains in mixed precision (optim.automatic_mp, torch.cuda.amp), which turns itself off on CPU.
"""

import importlib.util
import os
import sys
import types
import warnings

import numpy as np
from absl import app
from absl import flags

from benchmarks import speed  # its flags --rows, --repeats and --json are this module's too
from ihdm_jax import parallel

_ORIGINAL = flags.DEFINE_string(
    'original', None, 'A checkout of AaltoML/generative-inverse-heat-dissipation.'
)
_THREADS = flags.DEFINE_integer('threads', None, 'torch threads; default the CPUs of this process.')
flags.mark_flag_as_required('original')


def original_config(ours):
    """The original's default config for the data of `ours` (an ihdm_jax config), with its sizes."""
    import torch

    name = (
        'cifar10/default_cifar10_configs'
        if ours.data.dataset == 'cifar10'
        else 'mnist/default_mnist_configs'
    )
    # loaded from its file: the original's configs/ would clash with this repository's configs
    spec = importlib.util.spec_from_file_location(
        '_original_configs', os.path.join(_ORIGINAL.value, 'configs', name + '.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_default_configs()
    config.device = torch.device('cpu')
    config.data.image_size, config.data.num_channels = ours.data.image_size, ours.data.num_channels
    config.training.batch_size = ours.training.batch_size
    model = config.model
    for field in (
        'K',
        'sigma',
        'model_channels',
        'channel_mult',
        'num_res_blocks',
        'attention_levels',
        'dropout',
        'ema_rate',
    ):
        setattr(model, field, getattr(ours.model, field))
    # the original's schedule: K blur σ geometric from σ_min to σ_max, after σ = 0 at k = 0
    sigmas = np.exp(
        np.linspace(np.log(ours.model.blur_sigma_min), np.log(ours.model.blur_sigma_max), model.K)
    )
    model.blur_schedule = np.array([0] + list(sigmas))
    return config


def time_training(config, repeats, steps=5):
    """Median ms per step of the original's training step, and the model's parameter count."""
    import torch
    from model_code import utils as mutils
    from model_code.ema import ExponentialMovingAverage
    from scripts import losses

    from benchmarks import measure

    torch.manual_seed(config.seed)
    model = mutils.create_model(config)
    optimizer = losses.get_optimizer(config, model.parameters())
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    state = dict(optimizer=optimizer, model=model, step=0, ema=ema)
    scales = config.model.blur_schedule
    step = losses.get_step_fn(
        train=True,
        scales=scales,
        config=config,
        optimize_fn=losses.optimization_manager(config),
        heat_forward_module=mutils.create_forward_process_from_sigmas(
            config, scales, config.device
        ),
    )
    size, channels = config.data.image_size, config.data.num_channels
    batch = np.random.default_rng(0).uniform(
        size=(config.training.batch_size, size, size, channels)
    )
    batch = torch.from_numpy(batch.transpose(0, 3, 1, 2).astype(np.float32))

    def window(n):
        for _ in range(n):
            loss = step(state, batch)[0]
        return loss

    measure.median_seconds(lambda: window(1), 1)  # warm-up
    seconds = measure.median_seconds(lambda: window(steps), repeats) / steps
    return seconds * 1e3, sum(p.numel() for p in model.parameters())


def _sampling():
    """The original's scripts/sampling.py. Its scripts/datasets.py (mpi4py, blobfile,
    torchvision) serves only get_initial_sample, not used here: without them, a stand-in."""
    try:
        from scripts import sampling
    except ImportError:
        sys.modules['scripts.datasets'] = types.ModuleType('scripts.datasets')
        from scripts import sampling
    return sampling


def time_chain(config, n, delta, repeats):
    """Median seconds of the original's K-level sampling chain of n samples (fresh parameters)."""
    import torch
    from model_code import utils as mutils

    from benchmarks import measure

    torch.manual_seed(config.seed)
    model = mutils.create_model(config)
    size, channels = config.data.image_size, config.data.num_channels
    u_K = np.random.default_rng(1).uniform(size=(n, size, size, channels))
    u_K = torch.from_numpy(u_K.transpose(0, 3, 1, 2).astype(np.float32))
    sampler = _sampling().get_sampling_fn_inverse_heat(
        config, u_K, list(range(config.model.K + 1)), delta, config.device
    )
    model_fn = mutils.get_model_fn(model, train=False)
    sampler(model_fn)
    return measure.median_seconds(lambda: sampler(model_fn)[0], repeats)


def time_heat(repeats, sizes=(32, 64, 128)):
    """{size: ms per call} of the original's DCT blur of 64 RGB images, at speed.time_heat's t."""
    import torch
    from model_code import utils as mutils

    from benchmarks import measure

    result = {}
    for size in sizes:
        # blur σ as the original's schedules give them (float64 numpy), t = σ² / 2
        sigmas = np.sqrt(2 * np.linspace(0.1, size**2 / 8, 64))
        blur = mutils.DCTBlur(sigmas, size, 'cpu')
        u = torch.rand(64, 3, size, size, generator=torch.Generator().manual_seed(0))
        levels = torch.arange(64)
        result[size] = measure.time_call(blur, u, levels, repeats=repeats, min_window=0.05) * 1e3
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    unknown = set(speed.FLAG_ROWS.value) - set(speed.ROWS)
    if unknown:
        raise app.UsageError(
            f'Unknown rows {sorted(unknown)}; the rows are {", ".join(speed.ROWS)}.'
        )
    if speed.FLAG_PROFILE.value:
        raise app.UsageError("--profile is benchmarks.speed's only.")
    if not os.path.isdir(os.path.join(_ORIGINAL.value, 'model_code')):
        raise app.UsageError(f'{_ORIGINAL.value} is not a checkout of the original code.')
    from benchmarks import measure

    measure.check_new_file(speed.FLAG_JSON.value)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None  # before any work
    sys.path.insert(0, os.path.abspath(_ORIGINAL.value))
    # On CPU the original's torch.cuda.amp (its GradScaler, CIFAR-10's autocast) turns itself off.
    warnings.filterwarnings('ignore', message=r'.*torch\.cuda\.amp\.')
    warnings.filterwarnings('ignore', message=r'.*CUDA is not available')
    import torch

    torch.set_num_threads(_THREADS.value or parallel.host_cpus())
    info = dict(
        torch=torch.__version__,
        original=os.path.abspath(_ORIGINAL.value),
        cpu=measure.cpu_name(),
        cpu_cores=parallel.host_cpus(),
        threads=torch.get_num_threads(),
        load_average_1min=load,
    )
    rows, table = speed.measure_rows(
        speed.FLAG_ROWS.value,
        speed.FLAG_REPEATS.value,
        training=lambda ours, n: time_training(original_config(ours), n),
        chain=lambda ours, n: time_chain(
            original_config(ours), ours.sampling.batch_size, ours.sampling.delta, n
        ),
        heat=time_heat,
    )
    lines = [
        f'original PyTorch code, torch {info["torch"]}, {info["cpu"]}, {info["cpu_cores"]} cores, '
        f'{info["threads"]} threads' + ('' if load is None else f', load average {load:.1f}'),
        '',
        '| work | original PyTorch code |',
        '|---|---:|',
        *table,
    ]
    print('\n'.join(lines))
    if speed.FLAG_JSON.value:
        measure.write_json(
            speed.FLAG_JSON.value,
            dict(**info, command=measure.command(__spec__.name), results=rows),
        )


if __name__ == '__main__':
    app.run(main)
