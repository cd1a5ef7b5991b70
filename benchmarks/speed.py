"""The CPU speed table: training steps at two sizes, the sampling chain and the heat operator.

  python -m benchmarks.speed [--rows=small,small_nodropout,cifar10,chain,heat] [--profile]
      [--json=speed.json]

The rows are the work of the comparison with the original PyTorch code in docs/benchmarks.md,
so that a user can set this machine's figures beside those:
- small: the training step of a 1.11 M-parameter U-Net (28x28x1, 32 channels, mult (1, 2, 2), one
  res block, attention at 7x7, dropout 0.1), batch 32; small_nodropout: the same with dropout 0;
- cifar10: the training step of configs/cifar10.py's U-Net, batch 8;
- chain: the full 100-level sampling chain (Alg. 2) of 64 samples with the small U-Net;
- heat: F(t)u on a batch of 64 RGB images at 32, 64 and 128 px.
Training steps run on a mesh over all devices, as `--mode=train` does (programs.make_train_step),
with a fixed batch; the time is the median of `--repeats` windows. `--profile` adds where the
time of a small training step and of one sampler level goes (benchmarks/profile.py).

The device count is the one `ihdm_jax.main` uses: `parallel.use_cpu_cores()` runs first.
"""

import functools

from absl import app
from absl import flags

from ihdm_jax import parallel

ROWS = ('small', 'small_nodropout', 'cifar10', 'chain', 'heat')
FLAG_ROWS = flags.DEFINE_list('rows', list(ROWS), f'Rows of the table, of {", ".join(ROWS)}.')
FLAG_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed windows per row; the median is reported.')
FLAG_PROFILE = flags.DEFINE_bool(
    'profile',
    False,
    'Also print the time of each part of a small training step and of one sampler level.',
)
FLAG_JSON = flags.DEFINE_string('json', None, 'Write the results as JSON here (a new file).')


def small_config(dropout=0.1):
    """The 1.11 M-parameter U-Net of the comparison on 28x28x1 images, K = 100."""
    from ihdm_jax import defaults

    config = defaults.get_default_config()
    config.data.dataset, config.data.image_size, config.data.num_channels = 'mnist', 28, 1
    model = config.model
    model.K, model.blur_sigma_max = 100, 20.0
    model.model_channels, model.channel_mult, model.num_res_blocks = 32, (1, 2, 2), 1
    model.attention_levels, model.dropout = (2,), dropout
    config.training.batch_size = 32
    config.sampling.batch_size = config.sampling.num_samples = 64
    return config


def cifar10_config():
    import configs.cifar10

    config = configs.cifar10.get_config()
    config.training.batch_size = 8
    return config


def train_program(config, mesh):
    """(the compiled training step, a fresh state, a fixed random batch, the training key)."""
    import jax
    import numpy as np

    from ihdm_jax import programs
    from ihdm_jax import rng
    from ihdm_jax import state as state_lib

    size, channels = config.data.image_size, config.data.num_channels
    batch = (
        np.random.default_rng(0)
        .uniform(size=(config.training.batch_size, size, size, channels))
        .astype(np.float32)
    )
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    state = state_lib.init_state(config, mesh, rng.init_key(config.seed))
    step = programs.make_train_step(config, state_lib.model_graphdef(config), mesh)
    key = rng.train_key(config.seed)
    return step.lower(state, batch, key).compile(), state, batch, key


def time_training(config, mesh, repeats, steps=5):
    """Median ms per training step (benchmarks.model's measurement) and the parameter count."""
    import jax

    from benchmarks import model

    figures, state = model.benchmark_training(config, mesh, steps=steps, repeats=repeats)
    return figures['step_ms'], sum(x.size for x in jax.tree.leaves(state.params))


def _chain_inputs(config):
    import numpy as np

    from ihdm_jax import rng

    n, size = config.sampling.batch_size, config.data.image_size
    u_K = np.random.default_rng(1).uniform(size=(n, size, size, config.data.num_channels))
    return u_K.astype(np.float32), rng.example_keys(rng.sample_key(config.seed), n)


def time_chain(config, mesh, repeats):
    """Median seconds of the full K-level chain of config.sampling.batch_size samples
    (programs.Sampler.chains, as every job samples) at freshly initialised parameters."""
    import jax

    from benchmarks import measure
    from ihdm_jax import programs
    from ihdm_jax import rng
    from ihdm_jax import state as state_lib

    params = state_lib.init_state(config, mesh, rng.init_key(config.seed)).params
    sampler = programs.Sampler(config, mesh)
    u_K, keys = _chain_inputs(config)
    jax.block_until_ready(sampler.chains(params, u_K, keys))
    return measure.median_seconds(lambda: sampler.chains(params, u_K, keys), repeats)


def time_heat(repeats, sizes=(32, 64, 128)):
    """{size: ms per call} of jitted heat.heat_forward on 64 RGB images."""
    import jax
    import jax.numpy as jnp

    from benchmarks import measure
    from ihdm_jax import heat

    result = {}
    for size in sizes:
        u = jax.random.uniform(jax.random.key(0), (64, size, size, 3))
        t = jnp.linspace(0.1, size**2 / 8, 64)
        fn = jax.jit(heat.heat_forward)
        result[size] = measure.time_call(fn, u, t, repeats=repeats, min_window=0.05) * 1e3
    return result


def profiles(mesh):
    """Breakdowns (benchmarks/profile.py) of the small training step and of one sampler level
    (the chain's operations divided by K)."""
    import jax

    from benchmarks import profile
    from ihdm_jax import programs
    from ihdm_jax import sampling
    from ihdm_jax import state as state_lib

    config = small_config()
    compiled, state, batch, key = train_program(config, mesh)

    def step():
        nonlocal state
        state = jax.block_until_ready(compiled(state, batch, key)[0])

    step()
    train = profile.breakdown(compiled, step)

    K = config.model.K
    f = programs.residual(state_lib.model_graphdef(config))
    params = state.params

    def chain(params, u_K, raw_keys):
        noise = sampling.example_noise(jax.random.wrap_key_data(raw_keys), u_K.shape[1:])
        return sampling.sample_with_noise(
            functools.partial(f, params), u_K, K, config.sampling.delta, noise, ()
        )

    u_K, keys = _chain_inputs(config)
    sharding = parallel.batch_sharding(mesh)
    u_K, keys = jax.device_put(u_K, sharding), jax.device_put(keys, sharding)
    program = jax.jit(chain).lower(params, u_K, keys).compile()
    per_level = {
        key: ms / K
        for key, ms in profile.breakdown(
            program, lambda: jax.block_until_ready(program(params, u_K, keys)), calls=1
        ).items()
    }
    return train, per_level


def measure_rows(names, repeats, training, chain, heat):
    """The rows `names` of the table, each measured by the given code: training(config, repeats)
    -> (ms per step, parameters), chain(config, repeats) -> seconds, heat(repeats) -> {size: ms}.
    Returns (the figures by row, the table's markdown lines without its header)."""
    rows, lines = {}, []
    for row in names:
        if row in ('small', 'small_nodropout', 'cifar10'):
            config = (
                cifar10_config()
                if row == 'cifar10'
                else small_config(0.1 if row == 'small' else 0.0)
            )
            ms, count = training(config, repeats)
            rows[row] = dict(step_ms=ms, parameters=count, batch=config.training.batch_size)
            lines.append(
                f'| training step, {row}, {count:,} parameters, batch '
                f'{config.training.batch_size} | {ms:,.0f} ms |'
            )
        elif row == 'chain':
            seconds = chain(small_config(), max(1, repeats // 2))
            rows[row] = dict(seconds=seconds)
            lines.append(f'| 100-level sampling chain, 64 samples, small U-Net | {seconds:.1f} s |')
        else:
            rows[row] = heat(repeats)
            lines.append(
                '| heat operator F(t)u, batch 64 RGB, 32 / 64 / 128 px | '
                + ' / '.join(f'{ms:.2f}' for ms in rows[row].values())
                + ' ms |'
            )
    return rows, lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    unknown = set(FLAG_ROWS.value) - set(ROWS)
    if unknown:
        raise app.UsageError(f'Unknown rows {sorted(unknown)}; the rows are {", ".join(ROWS)}.')
    parallel.use_cpu_cores([32, 8, 64])
    from benchmarks import measure
    from benchmarks import profile

    measure.check_new_file(FLAG_JSON.value)
    info = measure.device_info()
    mesh = parallel.make_mesh()
    rows, table = measure_rows(
        FLAG_ROWS.value,
        FLAG_REPEATS.value,
        training=lambda config, n: time_training(config, mesh, n),
        chain=lambda config, n: time_chain(config, mesh, n),
        heat=time_heat,
    )
    lines = [measure.describe(info), '', '| work | ihdm_jax |', '|---|---:|', *table]
    print('\n'.join(lines))
    if FLAG_PROFILE.value:
        train, level = profiles(mesh)
        rows['profile'] = {
            'train_step': {' '.join(k).strip(): v for k, v in train.items()},
            'sampler_level': {' '.join(k).strip(): v for k, v in level.items()},
        }
        print('\nDevice time by part (ms; summed over devices), small U-Net\n')
        print(profile.markdown({'training step': train, 'one sampler level (of 100)': level}))
    if FLAG_JSON.value:
        measure.write_json(
            FLAG_JSON.value, dict(**info, command=measure.command(__spec__.name), results=rows)
        )


if __name__ == '__main__':
    app.run(main)
