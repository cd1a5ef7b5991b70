"""How well a trained diffusion model predicts each frequency of the noise, over time.

  python -m benchmarks.eps_error --config=configs/digits_blurring.py --workdir=runs/blurring
      [--times=0.02,0.1,0.2,0.3,0.5,0.7,0.9,0.99] [--num_images=64] [--json=FILE]

For `--num_images` test images x and each time t, draws u_t ~ q(u_t | x) and prints the mean
squared error of the EMA network's ε̂(u_t, t) against that draw's ε, per DCT coefficient
(Vᵀε − Vᵀε̂)², for the mean of the image (the DC coefficient), the coefficient (0, 1) and
rings of frequency index radius; with a_t(λ) of the lowest and highest frequency. Predicting
ε̂ = 0 scores 1. "DC lin" is the score of the best linear prediction of the DC coefficient of ε
from that of u_t alone, a² v/(a² v + s²) with v the variance of the images' DC coefficient: the
best network scores at most that.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import measure
from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import diffusion
from ihdm_jax import heat
from ihdm_jax import parallel
from ihdm_jax import processes
from ihdm_jax import programs
from ihdm_jax import state as state_lib

RINGS = ((1, 3), (3, 6), (6, 10), (10, 100))  # frequency index radius √(n² + m²), DC apart


def errors_by_time(config, workdir: str, times, num_images: int):
    """(step, [(t, DC error, DC lin, (0, 1) error, ring errors, a_t lowest, a_t highest)])."""
    mesh = parallel.make_mesh()
    params, step = checkpoint.restore_ema_params(config, workdir, mesh)
    process = processes.from_config(config).process  # the diffusion.Process
    f = programs.residual(state_lib.model_graphdef(config))
    source = data.make_source(config, 'test')
    x = 2.0 * source.load(np.arange(num_images)).astype(np.float32) / 255.0 - 1.0
    dc_var = float(np.var(np.asarray(heat.dct_2d(jnp.asarray(x)))[:, 0, 0, :]))
    n, m = np.meshgrid(np.arange(x.shape[1]), np.arange(x.shape[2]), indexing='ij')
    radius = np.sqrt(n**2 + m**2)

    @jax.jit
    def squared_error(t, key):
        t = jnp.full((x.shape[0],), t, jnp.float32)
        eps = jax.random.normal(key, x.shape, jnp.float32)
        u_t = diffusion.q_sample(process, jnp.asarray(x), t, eps)
        eps_hat = f(params, u_t, diffusion.TIME_SCALE * t)
        return jnp.mean(heat.dct_2d(eps_hat - eps) ** 2, axis=(0, 3))

    rows = []
    for i, t in enumerate(times):
        error = np.asarray(squared_error(t, jax.random.key(i)))
        a, s = diffusion.coefficients(process, jnp.full((1,), t), x.shape)
        a_dc, s_dc = float(a[0, 0, 0, 0]), float(s[0, 0, 0, 0])
        rings = [
            float(error[ring].mean()) if ring.any() else float('nan')  # none: small images
            for ring in ((radius >= lo) & (radius < hi) for lo, hi in RINGS)
        ]
        rows.append(
            (
                t,
                float(error[0, 0]),
                a_dc**2 * dc_var / (a_dc**2 * dc_var + s_dc**2),
                float(error[0, 1]),
                rings,
                float(a[0, 0, 1, 0]),
                float(a[0, -1, -1, 0]),
            )
        )
    return step, rows


def _define_flags():
    """The command line's flags, defined only when this module runs as a script (so that the
    tests can import it next to ihdm_jax.main, which defines --config too)."""
    f = types.SimpleNamespace(
        config=config_flags.DEFINE_config_file('config', None, "The run's config file."),
        workdir=flags.DEFINE_string('workdir', None, 'The trained workdir.'),
        times=flags.DEFINE_list(
            'times',
            ['0.02', '0.1', '0.2', '0.3', '0.5', '0.7', '0.9', '0.99'],
            'Times t in (0, 1].',
        ),
        num_images=flags.DEFINE_integer('num_images', 64, 'Test images.'),
        json=flags.DEFINE_string('json', None, 'Write the results as JSON here (a new file).'),
    )
    flags.mark_flags_as_required(['config', 'workdir'])
    return f


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if f.json.value:
        measure.check_new_file(f.json.value)
    config = f.config.value
    if not isinstance(processes.from_config(config), processes.Diffusion):
        raise app.UsageError(
            f'config.model.process={config.model.process!r} predicts no noise; '
            'pass a diffusion config.'
        )
    step, rows = errors_by_time(
        config, f.workdir.value, [float(t) for t in f.times.value], f.num_images.value
    )
    print(
        f'Checkpoint {step} of {f.workdir.value}, {f.num_images.value} test images: mean '
        'squared error of ε̂ per DCT coefficient (predicting 0 scores 1).\n'
    )
    rings = [f'radius {lo}-{hi}' for lo, hi in RINGS]
    print('| t | DC | DC lin | (0, 1) | ' + ' | '.join(rings) + ' | a_t lowest λ ≠ 0 | highest |')
    print('|' + '---:|' * (len(RINGS) + 6))
    for t, dc, linear, first, errors, a_low, a_high in rows:
        print(
            f'| {t:.2f} | {dc:.3f} | {linear:.3f} | {first:.3f} | '
            + ' | '.join(f'{e:.4f}' for e in errors)
            + f' | {a_low:.3g} | {a_high:.3g} |'
        )
    if f.json.value:
        measure.write_json(
            f.json.value,
            dict(
                **measure.device_info(),
                command=measure.command(__spec__.name),
                workdir=f.workdir.value,
                step=step,
                num_images=f.num_images.value,
                rings=RINGS,
                rows=[
                    dict(
                        t=t,
                        dc=dc,
                        dc_linear=linear,
                        first=first,
                        rings=errors,
                        a_lowest=a_low,
                        a_highest=a_high,
                    )
                    for t, dc, linear, first, errors, a_low, a_high in rows
                ],
            ),
        )


if __name__ == '__main__':
    app.run(functools.partial(main, f=_define_flags()))
